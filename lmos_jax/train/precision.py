"""Mixed-precision policies: which dtype params are stored in and which dtype computes.

`bf16` keeps float32 master weights and casts to bfloat16 for the forward/backward pass
(logits and loss stay float32); `bf16_full` stores bfloat16 params too. `bf16_matmul` keeps
everything float32 except the operands of the Dense layers' matmuls, rounded to bfloat16
and accumulated in float32, in both passes (JAX's "bfloat16" matmul precision, a TPU's
default for float32 matmuls; XLA:CPU ignores that setting, so
lmos_jax.models.layers.kernel_matmul applies it): on CPUs that multiply bf16 in hardware
(AVX512-BF16, AMX) XLA's dot of bf16 operands with float32 output ran 1.9x its float32 dot
(experiments/bench_bf16.py), while a dot with bf16 output, the `bf16` policy's, ran slower
than float32. `auto` picks bf16 on GPU/TPU, bf16_matmul on CPUs whose flags name a bf16 dot
instruction (avx512_bf16, amx_bf16), and fp32 on other CPUs, where bf16 operands would be
converted in software and run slower than float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lmos_jax.config.schema import CHOICES
from lmos_jax.parallel.host_cpu import bf16_dot_flags

POLICIES = CHOICES["train.precision"]


@dataclasses.dataclass(frozen=True)
class Policy:
  name: str
  param_dtype: Any
  compute_dtype: Any
  matmul_bf16: bool = False  # Dense matmuls on bf16 operands, float32 accumulation

  @property
  def bf16_operands(self) -> bool:
    """Whether the matmuls take bf16 operands (every policy but fp32): the dtype a CPU's
    matmul peak is probed in for the logged MFU."""
    return self.matmul_bf16 or self.compute_dtype == jnp.bfloat16


def auto_precision(backend: str, cpuinfo: str | None = None) -> tuple[str, str]:
  """(policy name, why) that `auto` resolves to on `backend`; `cpuinfo` defaults to this
  host's. The why goes into `lmos train`'s log line, so a run says what it chose."""
  if backend != "cpu":
    return "bf16", f"auto: bf16 compute on {backend}"
  flags = bf16_dot_flags(cpuinfo)
  if flags:
    return "bf16_matmul", (f"auto: this CPU multiplies bf16 in hardware ({flags[0]}); "
                           "--config.train.precision=fp32 for float32 matmuls")
  return "fp32", "auto: this CPU has no bf16 dot instructions"


def resolve_policy(name: str, backend: str | None = None, cpuinfo: str | None = None) -> Policy:
  """The concrete policy for `name` on `backend` (default: JAX's default backend); `auto`
  reads the CPU's flags from `cpuinfo` (default: this host's /proc/cpuinfo)."""
  if name not in POLICIES:
    raise ValueError(f"train.precision={name!r}: expected one of {', '.join(POLICIES)}")
  if name == "auto":
    name, _ = auto_precision(backend or jax.default_backend(), cpuinfo)
  if name == "fp32":
    return Policy("fp32", jnp.float32, jnp.float32)
  if name == "bf16_matmul":
    return Policy("bf16_matmul", jnp.float32, jnp.float32, matmul_bf16=True)
  if name == "bf16":
    return Policy("bf16", jnp.float32, jnp.bfloat16)
  return Policy("bf16_full", jnp.bfloat16, jnp.bfloat16)


def matmul_precision(policy: Policy):
  """The context a step traces its model under: JAX's "bfloat16" matmul precision for
  bf16_matmul (read by kernel_matmul), else nothing."""
  if policy.matmul_bf16:
    return jax.default_matmul_precision("bfloat16")
  return contextlib.nullcontext()


def cast_floats(tree: Any, dtype: Any) -> Any:
  """Casts floating-point leaves to `dtype`; integer leaves (e.g. quantized) stay as they are."""
  def cast(x):
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(cast, tree)
