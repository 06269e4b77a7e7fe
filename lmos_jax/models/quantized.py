"""Weight-only quantized kernels that stay quantized up to the matmul.

A `QArray` stands for a Dense kernel (layers..., in..., out...) as integer codes and float32
scales. Its leading axes are the stacked layers, as in the float kernel, so `lax.scan` over a
layer stack hands each layer a QArray of its own, and `Dense` multiplies by it through
`QArray.matmul`: on CPU a decode step's few rows go to the C++ kernel of cpu_kernels.py,
elsewhere the codes are converted right next to the dot, where XLA fuses the conversion
into the matmul. A layer's float weights never exist in memory, so a bandwidth-bound
decode step reads 1 (int8) or 1/2 (int4) byte per weight instead of 4.
(Dequantizing the whole stacked tree first, as a plain `tree.map` would, materializes every
float kernel as the scan's input and is slower than the float model.)

Layout, with I = prod(in), O = prod(out), g the group size and G = I / g:
- int8: q (..., I, O) int8; scale (..., G, O) float32, one per g consecutive inputs and
  output channel (G = 1: per output channel).
- int4: q (..., I/2, O) int8, byte row r holding input row r in its low nibble and row
  r + I/2 in its high nibble: each half unpacks with one shift into a matrix that feeds a
  dot directly (neighbouring rows would need an interleaving shuffle XLA does not fuse);
  scale as for int8, with G = 1 or even so that each half has whole groups.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lmos_jax.models import cpu_kernels

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized kernel: codes, scales, and the per-layer float shape they stand for."""

  q: Array
  scale: Array
  bits: int
  group_size: int
  kernel_shape: tuple[int, ...]  # one layer's (in..., out...)
  in_ndim: int

  @property
  def lead_shape(self) -> tuple[int, ...]:
    return tuple(self.scale.shape[:-2])

  @property
  def shape(self) -> tuple[int, ...]:
    """The float kernel's shape: stacked layer axes, then (in..., out...)."""
    return (*self.lead_shape, *self.kernel_shape)

  @property
  def dtype(self):
    return self.scale.dtype

  @property
  def nbytes(self) -> int:
    return int(self.q.size * self.q.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize)

  def codes(self) -> Array:
    """Signed codes (..., I, O) as int8 (int4 unpacked)."""
    return unpack_halves(self.q) if self.bits == 4 else self.q

  def dequantize(self, dtype=jnp.float32) -> Array:
    """The float kernel (..., in..., out...): the reference `matmul` must equal."""
    codes_xIO = self.codes()
    i, o = codes_xIO.shape[-2:]
    g_count = self.scale.shape[-2]
    w = (codes_xIO.reshape(*self.lead_shape, g_count, i // g_count, o).astype(jnp.float32)
         * self.scale[..., :, None, :])
    return w.reshape(self.shape).astype(dtype)

  def matmul(self, x: Array) -> Array:
    """x (..., in...) @ kernel -> (..., out...) for one layer's QArray, in x's dtype."""
    if self.lead_shape:
      raise ValueError(f"QArray with stacked axes {self.lead_shape}: multiply one layer at "
                       "a time (under the layer scan)")
    in_shape = self.kernel_shape[:self.in_ndim]
    out_shape = self.kernel_shape[self.in_ndim:]
    lead = x.shape[:x.ndim - self.in_ndim]
    x_BI = x.reshape(*lead, math.prod(in_shape))
    y_BO = qmatmul(x_BI, self.q, self.scale, self.bits)
    return y_BO.reshape(*lead, *out_shape)

  def columns(self, index: Array) -> Array:
    """Float columns of a one-layer (I, O) kernel at `index` (any shape) -> (*index, I).

    A tied embedding quantized as the LM head's kernel (D, V) looks its tokens up here.
    """
    codes_IX = jnp.take(self.codes(), index, axis=-1)
    scale_GX = jnp.take(self.scale, index, axis=-1)
    i, g_count = codes_IX.shape[0], scale_GX.shape[0]
    w_GgX = (codes_IX.reshape(g_count, i // g_count, *index.shape).astype(jnp.float32)
             * scale_GX[:, None])
    return jnp.moveaxis(w_GgX.reshape(i, *index.shape), 0, -1)


jax.tree_util.register_dataclass(QArray, data_fields=["q", "scale"],
                                 meta_fields=["bits", "group_size", "kernel_shape", "in_ndim"])


def is_qarray(x) -> bool:
  return isinstance(x, QArray)


def embedding_shape(embed) -> tuple[int, ...]:
  """(V, D) of a token embedding: a float table, or a quantized tied one, which is stored as
  the LM head's kernel (D, V) (compress.quantize.quantize_params)."""
  return tuple(embed.shape[::-1]) if is_qarray(embed) else tuple(embed.shape)


def has_qarrays(tree) -> bool:
  """Whether a params tree holds quantized kernels (a run of `lmos compress --method int*`)."""
  return any(is_qarray(x) for x in jax.tree.leaves(tree, is_leaf=is_qarray))


def pack_halves(codes_xIO: Array) -> Array:
  """Signed 4-bit codes (..., I, O) in [-8, 7] -> int8 (..., I/2, O): rows r and r + I/2."""
  i = codes_xIO.shape[-2]
  if i % 2:
    raise ValueError(f"int4 needs an even input size, got {i}")
  c = codes_xIO.astype(jnp.int8)
  lo, hi = c[..., :i // 2, :], c[..., i // 2:, :]
  return (lo & jnp.int8(0xF)) | jnp.left_shift(hi, jnp.int8(4))


def unpack_halves(packed_xHO: Array) -> Array:
  """Inverse of `pack_halves`: int8 (..., I/2, O) -> signed codes (..., I, O)."""
  lo, hi = _nibbles(packed_xHO)
  return jnp.concatenate([lo, hi], axis=-2)


def _nibbles(packed: Array) -> tuple[Array, Array]:
  """Sign-extended low and high nibbles by arithmetic shifts (no masks, no selects)."""
  four = jnp.int8(4)
  return jnp.right_shift(jnp.left_shift(packed, four), four), jnp.right_shift(packed, four)


def _scaled(codes_IO: Array, scale_GO: Array, dtype) -> Array:
  i, o = codes_IO.shape
  g_count = scale_GO.shape[0]
  w = codes_IO.reshape(g_count, i // g_count, o).astype(jnp.float32) * scale_GO[:, None, :]
  return w.reshape(i, o).astype(dtype)


def qmatmul(x_BI: Array, q: Array, scale_GO: Array, bits: int) -> Array:
  """x @ W for one layer's codes. On CPU, a decode step's few float32 rows go to the C++
  kernel of cpu_kernels.py (XLA:CPU's own conversion of the codes is slower than reading
  float32 weights); other backends and longer inputs take `qmatmul_xla`."""
  x_NI = x_BI.reshape(-1, x_BI.shape[-1])  # N: every leading position as one row
  if cpu_kernels.applies(x_NI):
    y_NO = jax.lax.platform_dependent(
        x_NI, q, scale_GO, cpu=lambda *a: cpu_kernels.qmatmul_cpu(*a, bits),
        default=lambda *a: qmatmul_xla(*a, bits))
    return y_NO.reshape(*x_BI.shape[:-1], y_NO.shape[-1])
  return qmatmul_xla(x_BI, q, scale_GO, bits)


def qmatmul_xla(x_BI: Array, q: Array, scale_GO: Array, bits: int) -> Array:
  """x @ W in jax.numpy: the codes converted next to the dot, for XLA to fuse (a GPU's
  matmul reads them as such); per-channel scales multiply the product (fewer ops than
  scaling the weights), group scales the converted codes inside the fused dot operand."""
  dtype = x_BI.dtype
  per_channel = scale_GO.shape[0] == 1
  if bits == 8:
    if per_channel:
      return (x_BI @ q.astype(dtype)) * scale_GO[0].astype(dtype)
    return x_BI @ _scaled(q, scale_GO, dtype)
  lo_HO, hi_HO = _nibbles(q)
  h = lo_HO.shape[0]
  x_lo, x_hi = x_BI[..., :h], x_BI[..., h:]
  if per_channel:
    return (x_lo @ lo_HO.astype(dtype) + x_hi @ hi_HO.astype(dtype)) * scale_GO[0].astype(dtype)
  half = scale_GO.shape[0] // 2
  return (x_lo @ _scaled(lo_HO, scale_GO[:half], dtype)
          + x_hi @ _scaled(hi_HO, scale_GO[half:], dtype))
