"""Builds the model a config names: `model.arch` -> a constructor taking `nnx.Rngs`."""

from __future__ import annotations

from typing import Callable

import numpy as np
from flax import nnx

from lmos_jax.config.loading import ConfigError
from lmos_jax.config.schema import CHOICES
from lmos_jax.models.gpt import GPT, gpt_config_from


def model_factory(model_cfg, vocab_size: int, item_text: np.ndarray | None = None
                  ) -> Callable[[nnx.Rngs], nnx.Module]:
  """A zero-allocation recipe: call it with Rngs (or under nnx.eval_shape) to build.

  item_text: arch rec, the encoder's item vectors (N, F) the model is built around; None
  gives zeros of that shape (a layout to restore a checkpoint into)."""
  if model_cfg.arch == "gpt":
    tcfg = gpt_config_from(model_cfg, vocab_size)
    return lambda rngs: GPT(tcfg, rngs=rngs)
  if model_cfg.arch == "bert":
    from lmos_jax.models.bert import BERT, bert_config_from
    bcfg = bert_config_from(model_cfg, vocab_size)
    head = model_cfg.get("head", "auto")
    return lambda rngs: BERT(bcfg, head=None if head == "auto" else head, rngs=rngs)
  if model_cfg.arch == "rec":
    from lmos_jax.models.rec import ItemSequenceModel
    tcfg = gpt_config_from(model_cfg, vocab_size)
    return lambda rngs: ItemSequenceModel(tcfg, model_cfg.item_repr, item_text,
                                          model_cfg.text_dim, id_dropout=model_cfg.id_dropout,
                                          rngs=rngs)
  raise ConfigError(f"config 'model.arch'={model_cfg.arch!r}: expected one of "
                    f"{', '.join(CHOICES['model.arch'])}")
