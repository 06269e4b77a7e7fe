"""Which params are matmul kernels, and how each kernel's axes split into layers/in/out.

Quantization and pruning act on the kernels of `Dense` layers only (embeddings and norms
stay dense float). A kernel is viewed as (layers, in, out): `batch_ndim` leading stacked
layer axes (scan_layers), then the Dense layer's `in_ndim` contracted axes, then outputs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
from flax import nnx

from lmos_jax.models.layers import Dense
from lmos_jax.tree import key_path

Path = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  batch_ndim: int  # leading stacked-layer axes
  in_ndim: int  # contracted (input) axes after them


def kernel_layouts(graphdef, params: dict) -> dict[Path, KernelLayout]:
  """Pure-dict path -> layout for every Dense kernel of the model."""
  model = nnx.merge(graphdef, params)
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Dense):
      names = node.kernel.get_metadata().get("out_sharding") or ()
      out[(*path, "kernel")] = KernelLayout(int(len(names) > 0 and names[0] == "layers"),
                                            node.in_ndim)
  if not out:
    raise ValueError("the model has no Dense kernels to compress")
  return out



def map_kernels(fn: Callable[[jax.Array, KernelLayout, Path], Any], params: dict,
                layouts: dict[Path, KernelLayout]) -> dict:
  """Applies fn to every kernel leaf; other leaves pass through unchanged."""
  def one(path, x):
    p = key_path(path)
    return fn(x, layouts[p], p) if p in layouts else x
  return jax.tree_util.tree_map_with_path(one, params)


def to_view(w: jax.Array, layout: KernelLayout) -> jax.Array:
  """(layers..., in..., out...) -> (L, I, O) with L = prod(layer dims) (1 if none)."""
  b, i = layout.batch_ndim, layout.in_ndim
  lead = math.prod(w.shape[:b])
  return w.reshape(lead, math.prod(w.shape[b:b + i]), math.prod(w.shape[b + i:]))


def layer_names(path: Path, w_shape: tuple[int, ...], layout: KernelLayout) -> list[str]:
  """Readable per-layer names ('blocks.3.attn.query') for reports; stacked kernels expand."""
  base = ".".join(str(k) for k in path[:-1])
  if layout.batch_ndim == 0:
    return [base]
  head, _, rest = base.partition(".")
  return [f"{head}.{i}.{rest}" for i in range(math.prod(w_shape[:layout.batch_ndim]))]
