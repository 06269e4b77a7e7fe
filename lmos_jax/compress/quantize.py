"""Weight-only int8/int4 quantization: per-channel or group-wise, symmetric, absmax scales;
and bfloat16 storage of the same kernels.

A quantized kernel is a `QArray` (lmos_jax.models.quantized: int8 codes, or int4 codes two
per byte, plus float32 scales) that stays quantized in memory, on disk and in the compiled
step, where each layer's matmul converts its codes. Quantization-aware training uses the
same quantizer with a straight-through estimator.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmos_jax.compress.kernels import KernelLayout, kernel_layouts, map_kernels, to_view
from lmos_jax.models.gpt import GPT
from lmos_jax.models.quantized import QArray, is_qarray, pack_halves
from lmos_jax.tree import key_path

Array = jax.Array


def qmax(bits: int) -> int:
  if bits not in (4, 8):
    raise ValueError(f"bits={bits}: expected 8 or 4")
  return 2 ** (bits - 1) - 1


def _grouped(w: Array, layout: KernelLayout, group_size: int) -> Array:
  v = to_view(w, layout).astype(jnp.float32)
  n_in = v.shape[1]
  g = n_in if group_size <= 0 else group_size
  if n_in % g:
    raise ValueError(f"group_size={group_size} does not divide a kernel's input size "
                     f"{n_in}; use a divisor of it or 0 (per-channel)")
  return v.reshape(v.shape[0], n_in // g, g, v.shape[2])


def _quantized(v_LGgO: Array, bits: int, clip_ratios: tuple[float, ...] = (1.0,)
               ) -> tuple[Array, Array]:
  """Symmetric codes (L, G, g, O) int8 and scales (L, G, 1, O) of grouped weights.

  The scale is absmax * r / qmax for the r of `clip_ratios` with the least squared error in
  each group: clipping a group's few largest weights buys a finer step for all the others,
  which at 4 bits (15 levels) is most of the error. (1.0,) is plain absmax."""
  m = qmax(bits)
  amax = jnp.max(jnp.abs(v_LGgO), axis=2, keepdims=True)
  best = None
  for r in clip_ratios:
    scale = jnp.where(amax == 0, 1.0, amax * r / m)
    codes = jnp.clip(jnp.round(v_LGgO / scale), -m, m)
    if len(clip_ratios) == 1:
      return codes.astype(jnp.int8), scale
    err = jnp.sum(jnp.square(v_LGgO - codes * scale), axis=2, keepdims=True)
    if best is None:
      best = (codes.astype(jnp.int8), scale, err)
      continue
    better = err < best[2]
    best = (jnp.where(better, codes.astype(jnp.int8), best[0]), jnp.where(better, scale, best[1]),
            jnp.minimum(err, best[2]))
  return best[0], best[1]


# Clipping ratios a post-training quantization tries per group (absmax down to 0.6 of it).
CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(9))


def quantize_kernel(w: Array, layout: KernelLayout, bits: int, group_size: int = 0,
                    clip_search: bool = True) -> QArray:
  """Symmetric quantization per output channel (group_size 0) or per input group, each
  scale the least-squares choice among CLIP_RATIOS of the absmax (`clip_search=False`:
  plain absmax)."""
  v = _grouped(w, layout, group_size)
  n_layers, n_groups, g, o = v.shape
  if bits == 4 and (n_groups * g % 2 or n_groups > 1 and n_groups % 2):
    raise ValueError(f"int4 group_size={group_size}: a kernel's input size {n_groups * g} "
                     "must split into an even number of groups (or use 0, per-channel)")
  codes, scale = _quantized(v, bits, CLIP_RATIOS if clip_search else (1.0,))
  codes = codes.reshape(n_layers, n_groups * g, o)
  if bits == 4:
    codes = pack_halves(codes)
  lead = w.shape[:layout.batch_ndim]
  return QArray(codes.reshape(*lead, *codes.shape[1:]), scale.reshape(*lead, n_groups, o),
                bits, g, tuple(w.shape[layout.batch_ndim:]), layout.in_ndim)


def dequantize_kernel(qa: QArray, dtype: Any = jnp.float32) -> Array:
  return qa.dequantize(dtype)


def quantize_params(graphdef, params: dict, bits: int, group_size: int = 0,
                    tied_embedding: bool = False) -> dict:
  """Every Dense kernel replaced by a QArray; norms and biases stay float.

  With `tied_embedding`, a GPT whose LM head is its embedding gets that table quantized too,
  stored as the head's kernel (D, V): the logits matmul reads it whole every decode step
  (at GPT-2's size as many bytes as all 12 layers' kernels), the lookup only a few columns.
  The table takes 8 bits even for int4 kernels (as llama.cpp keeps its output matrix at
  higher precision): it feeds every logit, and at 4 bits it alone cost the trained
  shakespeare-char model 0.011 of validation loss. `lmos compress` turns it on: with the
  CPU kernel (lmos_jax/models/cpu_kernels.py) the int8 head took GPT-2's batch-1 decode from
  1.56x to 2.43x dense float32 (experiments/bench_decode.py --preset gpt2 --quant).
  """
  layouts = kernel_layouts(graphdef, params)
  out = map_kernels(lambda w, lay, _: quantize_kernel(w, lay, bits, group_size), params,
                    layouts)
  if tied_embedding and has_tied_embedding(graphdef, params):
    out["embed"] = quantize_kernel(jnp.asarray(params["embed"]).T, KernelLayout(0, 1), 8,
                                   group_size if bits == 8 else 0)
  return out


def bf16_kernels(graphdef, params: dict) -> dict:
  """Every Dense kernel stored as bfloat16 (half the bytes); embeddings, norms and biases
  stay float32. Under float32 activations such a kernel multiplies as bf16 operands with
  float32 accumulation (lmos_jax.models.layers.kernel_matmul), the form XLA:CPU runs fastest
  on CPUs with AVX512-BF16: the activations are rounded to bf16 at each matmul, nothing else."""
  layouts = kernel_layouts(graphdef, params)
  return map_kernels(lambda w, _lay, _p: np.asarray(w).astype(jnp.bfloat16), params, layouts)


def has_tied_embedding(graphdef, params: dict) -> bool:
  """Whether the model's LM head is its token embedding (a GPT with tie_embeddings)."""
  model = nnx.merge(graphdef, params)
  return isinstance(model, GPT) and model.lm_head is None


def dequantize_params(params: Any, dtype: Any = jnp.float32) -> Any:
  """Float params from a tree that may hold QArrays (a tied embedding back to (V, D)): for
  exports and references; compiled steps take the QArrays themselves."""
  def one(path, x):
    if not is_qarray(x):
      return x
    w = x.dequantize(dtype)
    return w.T if key_path(path) == ("embed",) else w
  return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_qarray)


def fake_quant(w: Array, layout: KernelLayout, bits: int, group_size: int = 0) -> Array:
  """Quantize-dequantize in the forward pass, identity gradient (straight-through). The
  same quantizer as `quantize_kernel` (clip search included), so the weights a QAT run
  trains against are the ones `lmos compress` stores."""
  codes, scale = _quantized(_grouped(w, layout, group_size), bits, CLIP_RATIOS)
  wq = (codes.astype(jnp.float32) * scale).reshape(w.shape).astype(w.dtype)
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
