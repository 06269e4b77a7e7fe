"""Mixed-precision policies: which dtype params are stored in and which dtype computes.

`bf16` keeps float32 master weights and casts to bfloat16 for the forward/backward pass
(logits and loss stay float32); `bf16_full` stores bfloat16 params too. `auto` picks bf16
on GPU/TPU and fp32 on CPU, where jax 0.10's XLA runs a bf16 matmul with bf16 output slower
than float32 (experiments/bench_bf16.py; bf16 operands with float32 output are the fast
form, which bf16-compressed kernels use: lmos_jax.models.layers.kernel_matmul).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lmos_jax.config.schema import CHOICES

POLICIES = CHOICES["train.precision"]


@dataclasses.dataclass(frozen=True)
class Policy:
  name: str
  param_dtype: Any
  compute_dtype: Any


def resolve_policy(name: str, backend: str | None = None) -> Policy:
  """The concrete policy for `name` on `backend` (default: JAX's default backend)."""
  if name not in POLICIES:
    raise ValueError(f"train.precision={name!r}: expected one of {', '.join(POLICIES)}")
  if name == "auto":
    backend = backend or jax.default_backend()
    name = "fp32" if backend == "cpu" else "bf16"
  if name == "fp32":
    return Policy("fp32", jnp.float32, jnp.float32)
  if name == "bf16":
    return Policy("bf16", jnp.float32, jnp.bfloat16)
  return Policy("bf16_full", jnp.bfloat16, jnp.bfloat16)


def cast_floats(tree: Any, dtype: Any) -> Any:
  """Casts floating-point leaves to `dtype`; integer leaves (e.g. quantized) stay as they are."""
  def cast(x):
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(cast, tree)
