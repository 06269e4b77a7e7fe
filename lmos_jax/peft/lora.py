"""LoRA (Hu et al. 2021): y = x W + (alpha / r) * dropout(x) A B, with B = 0 at init.

`LoRADense` subclasses `Dense` and keeps its kernel/bias variables, so the base weights
stay where they were. Works on layer-stacked (scanned) blocks: A and B carry the same
leading 'layers' axis as the kernel and `lax.scan` slices them per layer.

Dropout keys: modules get no rng at call time, so each LoRA layer holds a `DropoutKey`
variable (uint32, zeros = off) that `set_dropout_keys` fills inside the loss function when
training; the stored value is never updated, so evaluation runs without dropout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmos_jax.config.loading import ConfigError
from lmos_jax.models.layers import Dense, dropout
from lmos_jax.peft.wrap import new_param, replace_dense, take_base

Array = jax.Array


class DropoutKey(nnx.Variable):
  """Raw uint32 PRNG key data per stacked layer; all zeros means dropout off."""


def _in_axes(x: Array, in_ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  return tuple(range(x.ndim - in_ndim, x.ndim)), tuple(range(in_ndim))


def input_dropout(x: Array, rate: float, key_var: DropoutKey | None) -> Array:
  """Dropout on the adapter input when a non-zero key was set (training), else identity."""
  if key_var is None or rate == 0.0:
    return x
  key = key_var[...]
  return jnp.where(jnp.any(key != 0), dropout(x, rate, key), x)


def make_dropout_key(lead: tuple[int, ...], rate: float) -> DropoutKey | None:
  return DropoutKey(jnp.zeros((*lead, 2), jnp.uint32)) if rate > 0 else None


class LoRADense(Dense):
  """Dense plus a rank-r update beside it (`peft.methods.merge_and_unload` folds the update
  into the kernel for export and serving)."""

  def __init__(self, base: Dense, rank: int, alpha: float, rate: float, *, rngs: nnx.Rngs):
    lead, in_s, out_s, lead_n, in_n, out_n = take_base(self, base)
    fan_in = int(np.prod(in_s))
    # A ~ N(0, 1/fan_in) so x A has unit scale; B = 0 makes the update zero at init.
    self.lora_a = new_param(
        jax.random.normal(rngs.params(), (*lead, *in_s, rank), jnp.float32) / math.sqrt(fan_in),
        (*lead_n, *in_n, "lora_rank"))
    self.lora_b = new_param(jnp.zeros((*lead, rank, *out_s), jnp.float32),
                            (*lead_n, "lora_rank", *out_n))
    self.scale = float(alpha) / rank
    self.rate = float(rate)
    self.dropout_key = make_dropout_key(lead, rate)

  def lora_delta(self, x: Array) -> Array:
    xa, wa = _in_axes(x, self.in_ndim)
    h = jnp.tensordot(input_dropout(x, self.rate, self.dropout_key),
                      self.lora_a[...].astype(x.dtype), axes=(xa, wa))
    return jnp.tensordot(h, self.lora_b[...].astype(x.dtype), axes=((-1,), (0,)))

  def __call__(self, x: Array) -> Array:
    return super().__call__(x) + self.scale * self.lora_delta(x)

  def delta_kernel(self) -> Array:
    """scale * A B in the kernel's (lead..., in..., out...) shape."""
    a, b = self.lora_a[...], self.lora_b[...]
    lead = a.ndim - self.in_ndim - 1
    a2 = a.reshape(*a.shape[:lead], -1, a.shape[-1])
    b2 = b.reshape(*b.shape[:lead + 1], -1)
    return (self.scale * (a2 @ b2)).reshape(self.kernel.shape).astype(self.kernel.dtype)


def apply_lora(model: nnx.Module, target: str, rank: int, alpha: float, rate: float,
               rngs: nnx.Rngs | int = 0) -> list[str]:
  """In place: LoRA on every Dense whose path matches `target`; returns the wrapped paths."""
  if rank <= 0:
    raise ConfigError(f"config 'peft.rank'={rank} must be positive")
  if not 0.0 <= rate < 1.0:
    raise ConfigError(f"config 'peft.dropout'={rate} must be in [0, 1)")
  rngs = nnx.Rngs(params=rngs) if isinstance(rngs, int) else rngs
  return replace_dense(model, target, lambda d, _: LoRADense(d, rank, alpha, rate, rngs=rngs),
                       "peft.target_modules")


def set_dropout_keys(model: nnx.Module, rng: Array) -> None:
  """Fills every PEFT dropout key from `rng` (distinct per module and per stacked layer)."""
  mods = [m for _, m in nnx.iter_modules(model)
          if getattr(m, "dropout_key", None) is not None]
  for i, m in enumerate(mods):
    lead = m.dropout_key.shape[:-1]
    keys = jax.random.split(jax.random.fold_in(rng, i), max(int(np.prod(lead)), 1))
    m.dropout_key[...] = keys.reshape(*lead, 2).astype(jnp.uint32)
