"""Saving compressed params as they are: int8/int4 codes, or sparse values + a bitmask.

One safetensors file per model. Tensor names are the dotted param paths; the JSON header
records how to rebuild each leaf (dense, quantized, or sparse) and the original key types
(nested dicts from `nnx.List` use int keys), so `load_compressed` returns the same tree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from lmos_jax.tree import key_path
from lmos_jax.models.quantized import QArray, is_qarray


def _name(path: tuple) -> str:
  return ".".join(str(k) for k in path)


def save_params(params: Any, path: str | Path, *, sparse: bool = False,
                extra: dict | None = None) -> int:
  """Writes the tree; with `sparse`, leaves with zeros store nonzeros + a packed bitmask.

  Returns the file size in bytes.
  """
  tensors: dict[str, np.ndarray] = {}
  leaves = []
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)
  for kpath, leaf in flat:
    keys = key_path(kpath)
    name = _name(keys)
    entry = {"path": [[type(k).__name__, k] for k in keys], "name": name}
    if is_qarray(leaf):
      tensors[name + ".q"] = np.asarray(leaf.q)
      tensors[name + ".scale"] = np.asarray(leaf.scale)
      entry.update(kind="quant", bits=leaf.bits, group_size=leaf.group_size,
                   kernel_shape=list(leaf.kernel_shape), in_ndim=leaf.in_ndim)
    else:
      x = np.asarray(leaf)
      nz = x != 0
      if sparse and x.ndim >= 2 and not nz.all():
        tensors[name + ".values"] = np.ascontiguousarray(x[nz])
        tensors[name + ".mask"] = np.packbits(nz.reshape(-1))
        entry.update(kind="sparse", shape=list(x.shape), dtype=str(x.dtype))
      else:
        tensors[name] = np.ascontiguousarray(x)
        entry.update(kind="dense")
    leaves.append(entry)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(path), metadata={"lmos_leaves": json.dumps(leaves),
                                          "lmos_extra": json.dumps(extra or {})})
  return path.stat().st_size


def _key(t: str, k):
  return int(k) if t == "int" else k


def load_compressed(path: str | Path) -> tuple[dict, dict]:
  """(params tree, extra metadata) as `save_params` wrote them; QArrays stay quantized."""
  from safetensors import safe_open

  with safe_open(str(path), framework="numpy") as f:
    meta = f.metadata() or {}
  if "lmos_leaves" not in meta:
    raise ValueError(f"{path} was not written by lmos save_params (no lmos_leaves header)")
  tensors = load_file(str(path))
  tree: dict = {}
  for entry in json.loads(meta["lmos_leaves"]):
    keys = [_key(t, k) for t, k in entry["path"]]
    name = entry["name"]
    if entry["kind"] == "quant":
      if "kernel_shape" not in entry:
        raise ValueError(f"{path}: quantized with an older lmos layout (int codes packed "
                         "differently); run `lmos compress` on the source run again")
      leaf = QArray(jax.numpy.asarray(tensors[name + ".q"]),
                    jax.numpy.asarray(tensors[name + ".scale"]), entry["bits"],
                    entry["group_size"], tuple(entry["kernel_shape"]), entry["in_ndim"])
    elif entry["kind"] == "sparse":
      shape = tuple(entry["shape"])
      nz = np.unpackbits(tensors[name + ".mask"])[:int(np.prod(shape))].astype(bool)
      dense = np.zeros(nz.shape, entry["dtype"])
      dense[nz] = tensors[name + ".values"]
      leaf = dense.reshape(shape)
    else:
      leaf = tensors[name]
    node = tree
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
  return tree, json.loads(meta.get("lmos_extra", "{}"))
