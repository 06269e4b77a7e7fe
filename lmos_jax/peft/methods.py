"""The `peft` config switch: full | lora | adapters | adalora, applied to any lmos model.

`wrap_factory` turns a model recipe into one that builds the adapted model (so abstract
init, sharding and checkpoint layout see the PEFT params); `peft_loss` adds the per-step
dropout keys and AdaLoRA's orthogonality penalty; `peft_optimizer` wraps the optimizer
with AdaLoRA's budget. Everything else (which params train) is `trainable_fn`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lmos_jax.config.loading import ConfigError
from lmos_jax.config.schema import CHOICES, default_t_final
from lmos_jax.peft.adalora import (BudgetSchedule, adalora, apply_adalora,
                                   orthogonality_penalty)
from lmos_jax.peft.adapters import apply_adapters
from lmos_jax.peft.lora import apply_lora, set_dropout_keys
from lmos_jax.peft.wrap import trainable_fn

METHODS = CHOICES["peft.method"]
DEFAULT_TARGETS = {"lora": r"attn/(query|value)$", "adalora": r"attn/(query|key|value|out)$",
                   "adapters": r"(attn/out|mlp/down)$"}


def check_method(p) -> None:
  if p.method not in METHODS:
    raise ConfigError(f"config 'peft.method'={p.method!r}: expected one of {', '.join(METHODS)}")


def target_of(p) -> str:
  return p.target_modules or DEFAULT_TARGETS.get(p.method, "")


def apply_peft(model: nnx.Module, p, rngs: nnx.Rngs | int = 0) -> list[str]:
  """In place: the configured PEFT modules; returns the wrapped Dense paths."""
  check_method(p)
  if p.method == "lora":
    return apply_lora(model, target_of(p), p.rank, p.alpha, p.dropout, rngs)
  if p.method == "adapters":
    return apply_adapters(model, target_of(p), p.adapter_size, p.dropout, rngs=rngs)
  if p.method == "adalora":
    return apply_adalora(model, target_of(p), p.rank, p.alpha, p.dropout, rngs)
  return []


def wrap_factory(make_model: Callable[[nnx.Rngs], nnx.Module], p
                 ) -> Callable[[nnx.Rngs], nnx.Module]:
  """A recipe that builds the base model and then wraps it (also under eval_shape/jit)."""
  check_method(p)
  if p.method == "full":
    return make_model

  def make(rngs: nnx.Rngs) -> nnx.Module:
    model = make_model(rngs)
    apply_peft(model, p, rngs)
    return model
  return make


def trainable_for(p) -> Callable | None:
  check_method(p)
  return trainable_fn(p.method, p.trainable_extra)


def peft_loss(loss_fn: Callable, p) -> Callable:
  """loss_fn plus dropout keys (training only) and AdaLoRA's orthogonality penalty."""
  if p.method == "full":
    return loss_fn
  reg = p.orth_reg if p.method == "adalora" else 0.0

  def loss(model, batch, rng):
    if rng is not None and p.dropout > 0:
      set_dropout_keys(model, jax.random.fold_in(rng, 0x5EED))
    loss_sum, weight, aux = loss_fn(model, batch, rng)
    if reg > 0 and rng is not None:
      # Sums are divided by the batch weight later: scale so the penalty enters once.
      loss_sum = loss_sum + reg * orthogonality_penalty(model) * weight
    return loss_sum, weight, aux
  return loss


def budget_schedule(p, total_steps: int) -> BudgetSchedule:
  return BudgetSchedule(init_rank=p.rank, target_rank=p.target_rank, t_init=p.t_init,
                        t_final=p.t_final or default_t_final(total_steps),
                        delta_t=p.delta_t, total_steps=total_steps, beta1=p.beta1,
                        beta2=p.beta2)


def peft_optimizer(tx: optax.GradientTransformation, p, total_steps: int
                   ) -> optax.GradientTransformation:
  """AdaLoRA's budget wrapper around the (partitioned) optimizer; others pass through."""
  if p.method != "adalora":
    return tx
  return adalora(tx, budget_schedule(p, total_steps), p.lambda_lr_scale)


def merge_and_unload(model: nnx.Module) -> int:
  """In place: LoRA and AdaLoRA updates folded into their kernels and the layers turned back
  into plain `Dense`, so the param tree is the base model's (for HF export or serving).

  Houlsby adapters are nonlinear and cannot be folded: an error says so. Returns the count.
  """
  from lmos_jax.models.layers import Dense
  from lmos_jax.peft.adalora import SVDDense, svd_delta_kernel
  from lmos_jax.peft.adapters import AdapterDense
  from lmos_jax.peft.lora import LoRADense
  from lmos_jax.peft.wrap import set_child
  hits = [(p, m) for p, m in nnx.iter_modules(model)
          if isinstance(m, (LoRADense, SVDDense, AdapterDense))]
  for path, m in hits:
    if isinstance(m, AdapterDense):
      raise ValueError(f"{'/'.join(map(str, path))}: Houlsby adapters are nonlinear and "
                       "cannot be merged into the base weights; serve the adapted model "
                       "(lmos predict) instead of exporting it")
    if isinstance(m, LoRADense):
      kernel = m.kernel[...] + m.delta_kernel()
    else:
      kernel = m.kernel[...] + svd_delta_kernel(m)
    plain = Dense((1,) * m.in_ndim, (1,), (None,) * (m.in_ndim + 1),
                  use_bias=m.bias is not None, std=0.0, rngs=nnx.Rngs(0))
    plain.kernel = m.kernel
    plain.kernel[...] = kernel
    plain.bias = m.bias
    set_child(model, tuple(path), plain)
  return len(hits)


def merged_params(make_model: Callable[[nnx.Rngs], nnx.Module], p, params: dict) -> dict:
  """Base-model params with a PEFT run's LoRA/AdaLoRA updates merged in (pure dicts)."""
  if p.method == "full":
    return params
  graphdef = nnx.split(nnx.eval_shape(lambda: wrap_factory(make_model, p)(nnx.Rngs(0))))[0]
  return merged_model(graphdef, params)[1]


def merged_model(graphdef: nnx.GraphDef, params: dict) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, params) of the base model, from a PEFT-wrapped model's graphdef and params,
  with its LoRA/AdaLoRA updates folded into the kernels: what inference runs, since a folded
  layer is one matmul where the adapted one adds two low-rank ones beside it (~10% of a
  served MiniLM batch at rank 8)."""
  model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
  merge_and_unload(model)
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)
