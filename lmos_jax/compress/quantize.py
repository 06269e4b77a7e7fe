"""Weight-only int8/int4 quantization: per-channel or group-wise, symmetric, absmax scales.

A quantized kernel is a `QArray` (int8 codes, or int4 codes packed two per byte, plus float32
scales) that stays quantized in memory and on disk; `dequantize_params` runs inside the
compiled step, so the float weights exist only transiently for each matmul. Quantization-aware
training uses the same quantizer with a straight-through estimator.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lmos_jax.compress.kernels import KernelLayout, kernel_layouts, map_kernels, to_view

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class QArray:
  """Quantized kernel: codes (L, I/g, g, O) (int8, or packed uint8 for int4) and scales."""

  q: Array
  scale: Array  # (L, I/g, 1, O) float32
  bits: int
  group_size: int
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return int(self.q.size * self.q.dtype.itemsize + self.scale.size * 4)


jax.tree_util.register_dataclass(QArray, data_fields=["q", "scale"],
                                 meta_fields=["bits", "group_size", "shape"])


def qmax(bits: int) -> int:
  if bits not in (4, 8):
    raise ValueError(f"bits={bits}: expected 8 or 4")
  return 2 ** (bits - 1) - 1


def pack_int4(q: Array) -> Array:
  """Signed 4-bit codes (any shape, values in [-8, 7]) -> uint8, two per byte, flattened."""
  flat = q.reshape(-1).astype(jnp.int32)
  flat = jnp.pad(flat, (0, flat.size % 2))
  lo, hi = flat[0::2] & 0xF, flat[1::2] & 0xF
  return (lo | (hi << 4)).astype(jnp.uint8)


def unpack_int4(packed: Array, size: int) -> Array:
  """Inverse of pack_int4: the first `size` signed codes as int8."""
  p = packed.astype(jnp.int32)
  both = jnp.stack([p & 0xF, p >> 4], axis=-1).reshape(-1)[:size]
  return jnp.where(both >= 8, both - 16, both).astype(jnp.int8)


def _grouped(w: Array, layout: KernelLayout, group_size: int) -> Array:
  v = to_view(w, layout).astype(jnp.float32)
  n_in = v.shape[1]
  g = n_in if group_size <= 0 else group_size
  if n_in % g:
    raise ValueError(f"group_size={group_size} does not divide a kernel's input size "
                     f"{n_in}; use a divisor of it or 0 (per-channel)")
  return v.reshape(v.shape[0], n_in // g, g, v.shape[2])


def quantize_kernel(w: Array, layout: KernelLayout, bits: int, group_size: int = 0) -> QArray:
  """Symmetric absmax quantization per output channel (group_size 0) or per input group."""
  m = qmax(bits)
  v = _grouped(w, layout, group_size)
  scale = jnp.max(jnp.abs(v), axis=2, keepdims=True) / m
  scale = jnp.where(scale == 0, 1.0, scale)
  q = jnp.clip(jnp.round(v / scale), -m, m).astype(jnp.int8)
  codes = pack_int4(q) if bits == 4 else q
  return QArray(codes, scale, bits, v.shape[2], tuple(w.shape))


def dequantize_kernel(qa: QArray, dtype: Any = jnp.float32) -> Array:
  n = qa.scale.shape[0] * qa.scale.shape[1] * qa.group_size * qa.scale.shape[3]
  q = unpack_int4(qa.q, n) if qa.bits == 4 else qa.q
  q = q.reshape(qa.scale.shape[0], qa.scale.shape[1], qa.group_size, qa.scale.shape[3])
  return (q.astype(jnp.float32) * qa.scale).reshape(qa.shape).astype(dtype)


def is_qarray(x) -> bool:
  return isinstance(x, QArray)


def quantize_params(graphdef, params: dict, bits: int, group_size: int = 0) -> dict:
  """Every Dense kernel replaced by a QArray; embeddings, norms and biases stay float."""
  layouts = kernel_layouts(graphdef, params)
  return map_kernels(lambda w, lay, _: quantize_kernel(w, lay, bits, group_size), params,
                     layouts)


def dequantize_params(params: Any, dtype: Any = jnp.float32) -> Any:
  """Float params from a tree that may hold QArrays (used inside the compiled step)."""
  return jax.tree.map(lambda x: dequantize_kernel(x, dtype) if is_qarray(x) else x, params,
                      is_leaf=is_qarray)


def fake_quant(w: Array, layout: KernelLayout, bits: int, group_size: int = 0) -> Array:
  """Quantize-dequantize in the forward pass, identity gradient (straight-through)."""
  wq = dequantize_kernel(quantize_kernel(w, layout, bits, group_size), w.dtype)
  return w + jax.lax.stop_gradient(wq - w)


def qat_loss(loss_fn: Callable, graphdef, params_like: dict, bits: int,
             group_size: int = 0) -> Callable:
  """Wraps a task loss (model, batch, rng) so every Dense kernel is fake-quantized first."""
  layouts = kernel_layouts(graphdef, params_like)

  def wrapped(model, batch, rng):
    gd, state = nnx.split(model)
    pure = map_kernels(lambda w, lay, _: fake_quant(w, lay, bits, group_size),
                       nnx.to_pure_dict(state), layouts)
    nnx.replace_by_pure_dict(state, pure)
    return loss_fn(nnx.merge(gd, state), batch, rng)
  return wrapped


def param_bytes(params: Any) -> int:
  """In-memory bytes of a (possibly quantized) params tree."""
  leaves = jax.tree.leaves(params, is_leaf=is_qarray)
  return sum(x.nbytes if is_qarray(x) else int(x.size * x.dtype.itemsize) for x in leaves)


def count_weights(params: Any) -> int:
  """Number of weights the tree represents (a QArray counts its original shape)."""
  leaves = jax.tree.leaves(params, is_leaf=is_qarray)
  return sum(math.prod(x.shape) if is_qarray(x) else int(x.size) for x in leaves)
