"""Builds the model a config names: `model.arch` -> a constructor taking `nnx.Rngs`."""

from __future__ import annotations

from typing import Callable

from flax import nnx

from lmos_jax.config.loading import ConfigError
from lmos_jax.config.schema import CHOICES
from lmos_jax.models.gpt import GPT, gpt_config_from


def model_factory(model_cfg, vocab_size: int) -> Callable[[nnx.Rngs], nnx.Module]:
  """A zero-allocation recipe: call it with Rngs (or under nnx.eval_shape) to build."""
  if model_cfg.arch == "gpt":
    tcfg = gpt_config_from(model_cfg, vocab_size)
    return lambda rngs: GPT(tcfg, rngs=rngs)
  if model_cfg.arch == "bert":
    from lmos_jax.models.bert import BERT, bert_config_from
    bcfg = bert_config_from(model_cfg, vocab_size)
    head = model_cfg.get("head", "auto")
    return lambda rngs: BERT(bcfg, head=None if head == "auto" else head, rngs=rngs)
  raise ConfigError(f"config 'model.arch'={model_cfg.arch!r}: expected one of "
                    f"{', '.join(CHOICES['model.arch'])}")
