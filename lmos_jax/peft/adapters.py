"""Houlsby adapters (Houlsby et al. 2019): a bottleneck MLP with its own residual.

An adapter sits on a sub-layer's output projection, before the block's residual add:
y = W x; y <- y + up(gelu(down(y))). Wrapping the attention output projection and the
FFN down projection puts one adapter after attention and one after the FFN, as in the
paper. `up` is zero at init, so the adapted model equals the base model exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmos_jax.config.loading import ConfigError
from lmos_jax.models.layers import Dense
from lmos_jax.peft.lora import input_dropout, make_dropout_key
from lmos_jax.peft.wrap import new_param, replace_dense, take_base

Array = jax.Array


class AdapterDense(Dense):
  """Dense followed by a residual bottleneck adapter of width `size`."""

  def __init__(self, base: Dense, size: int, rate: float, init_std: float, *,
               rngs: nnx.Rngs):
    lead, _, out_s, lead_n, _, out_n = take_base(self, base)
    if len(out_s) != 1:
      raise ValueError(f"adapters need a Dense with one output axis, got output shape {out_s}; "
                       "target the attention output / FFN down projections")
    (d,), (d_name,) = out_s, out_n
    self.adapter_down = new_param(
        init_std * jax.random.normal(rngs.params(), (*lead, d, size), jnp.float32),
        (*lead_n, d_name, "adapter"))
    self.adapter_down_bias = new_param(jnp.zeros((*lead, size), jnp.float32),
                                       (*lead_n, "adapter"))
    self.adapter_up = new_param(jnp.zeros((*lead, size, d), jnp.float32),
                                (*lead_n, "adapter", d_name))
    self.adapter_up_bias = new_param(jnp.zeros((*lead, d), jnp.float32), (*lead_n, d_name))
    self.rate = float(rate)
    self.dropout_key = make_dropout_key(lead, rate)

  def __call__(self, x: Array) -> Array:
    y = super().__call__(x)
    dt = y.dtype
    h = y @ self.adapter_down[...].astype(dt) + self.adapter_down_bias[...].astype(dt)
    h = input_dropout(jax.nn.gelu(h), self.rate, self.dropout_key)
    return y + h @ self.adapter_up[...].astype(dt) + self.adapter_up_bias[...].astype(dt)


def apply_adapters(model: nnx.Module, target: str, size: int, rate: float,
                   init_std: float = 1e-2, rngs: nnx.Rngs | int = 0) -> list[str]:
  """In place: an adapter after every Dense matching `target`; returns the wrapped paths."""
  if size <= 0:
    raise ConfigError(f"config 'peft.adapter_size'={size} must be positive")
  rngs = nnx.Rngs(params=rngs) if isinstance(rngs, int) else rngs
  return replace_dense(model, target,
                       lambda d, _: AdapterDense(d, size, rate, init_std, rngs=rngs),
                       "peft.target_modules")
