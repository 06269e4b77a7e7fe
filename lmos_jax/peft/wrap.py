"""How a model is wrapped for parameter-efficient finetuning.

PEFT here is module surgery: every `Dense` whose path matches a regex is replaced by a
subclass that keeps the *same* `kernel`/`bias` variables (so base-weight paths, checkpoints
and HF conversion are unchanged) and adds its own small parameters. The set of trainable
params is a predicate on param paths, which the optimizer (`optax.partition`) and the train
step (differentiate only the trainable sub-tree) both use.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmos_jax.config.loading import ConfigError
from lmos_jax.models.layers import Dense
from lmos_jax.parallel.sharding import variable_names
from lmos_jax.tree import module_path, path_names

Array = jax.Array
PathFn = Callable[[tuple[str, ...]], bool]

# Param names that PEFT modules add; any param path ending in one of them is trainable.
PEFT_PARAM_NAMES = ("lora_a", "lora_b", "lora_p", "lora_lambda", "lora_q",
                    "adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")



def dense_paths(model: nnx.Module) -> list[str]:
  return [module_path(p) for p, m in nnx.iter_modules(model) if isinstance(m, Dense)]


def stacked_dims(variable: nnx.Variable) -> int:
  """How many leading axes are layer stacking (nnx.vmap'ed blocks carry a 'layers' name)."""
  names = variable_names(variable) or ()
  n = 0
  while n < len(names) and names[n] == "layers":
    n += 1
  return n


def dense_layout(dense: Dense) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...],
                                        tuple, tuple, tuple]:
  """(lead, in, out) shapes and logical names of a (possibly layer-stacked) Dense kernel."""
  shape = tuple(dense.kernel.shape)
  names = variable_names(dense.kernel) or (None,) * len(shape)
  lead = stacked_dims(dense.kernel)
  cut = lead + dense.in_ndim
  return (shape[:lead], shape[lead:cut], shape[cut:], tuple(names[:lead]),
          tuple(names[lead:cut]), tuple(names[cut:]))


def take_base(wrapper: Dense, base: Dense) -> tuple[tuple[int, ...], tuple[int, ...],
                                                   tuple[int, ...], tuple, tuple, tuple]:
  """Gives a PEFT wrapper the base Dense's kernel, bias and input rank (so the wrapper still
  computes what the base did, sharing its parameters) and returns the base's `dense_layout`,
  from which each method shapes its own parameters."""
  wrapper.in_ndim = base.in_ndim
  wrapper.kernel, wrapper.bias = base.kernel, base.bias
  return dense_layout(base)


def new_param(value: Array, names: tuple) -> nnx.Param:
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def set_child(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  """Replaces the submodule at `path` (attribute names and list indices) with `new`: how
  a method wraps a Dense, and how merging puts the plain one back."""
  parent = model
  for p in path[:-1]:
    parent = parent[p] if isinstance(p, int) else getattr(parent, p)
  last = path[-1]
  if isinstance(last, int):
    parent[last] = new
  else:
    setattr(parent, last, new)


def replace_dense(model: nnx.Module, pattern: str, make: Callable[[Dense, str], Dense],
                  field: str) -> list[str]:
  """Replaces every Dense whose path matches `pattern` (re.search) by `make(dense, path)`.

  Raises naming `field` (the config key) and the available paths when nothing matches.
  """
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"config {field!r}={pattern!r} is not a valid regex: {e}") from None
  hits = [(p, m) for p, m in nnx.iter_modules(model)
          if isinstance(m, Dense) and type(m) is Dense and regex.search(module_path(p))]
  if not hits:
    raise ConfigError(f"config {field!r}={pattern!r} matched no Dense layer; the model's "
                      f"Dense paths are: {', '.join(dense_paths(model))}")
  for path, dense in hits:
    set_child(model, tuple(path), make(dense, module_path(path)))
  return [module_path(p) for p, _ in hits]


def trainable_fn(method: str, extra: str) -> PathFn | None:
  """Predicate on param paths: PEFT params plus those matching the `extra` regex.

  None for full finetuning (everything trains, no partition).
  """
  if method == "full":
    return None
  regex = re.compile(extra) if extra else None

  def trainable(names: tuple[str, ...]) -> bool:
    if names and names[-1] in PEFT_PARAM_NAMES:
      return True
    return bool(regex and regex.search("/".join(names)))
  return trainable


def split_by(params: Any, keep: PathFn) -> tuple[dict[str, Any], dict[str, Any]]:
  """Flat {'a/b/c': leaf} dicts of the params where keep(path) is True / False."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  yes, no = {}, {}
  for path, leaf in flat:
    names = path_names(path)
    (yes if keep(names) else no)["/".join(names)] = leaf
  return yes, no


def count_trainable(params: Any, trainable: PathFn | None) -> tuple[int, int]:
  """(trainable, total) parameter counts; works on arrays or ShapeDtypeStructs."""
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  if trainable is None:
    return total, total
  yes, _ = split_by(params, trainable)
  return sum(int(np.prod(x.shape)) for x in yes.values()), total


def trainable_report(params: Any, trainable: PathFn | None) -> str:
  n, total = count_trainable(params, trainable)
  return f"trainable params {n:,} of {total:,} ({100.0 * n / max(total, 1):.3f}%)"


def overlay_params(params: dict, flat: dict[str, Any], what: str) -> dict:
  """A copy of nested `params` with leaves replaced from flat {'a/b': array}; strict.

  Every key must exist with the same shape: a wrong base model fails naming the tensor.
  """
  out_flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  index = {"/".join(path_names(p)): i for i, (p, _) in enumerate(out_flat)}
  leaves = [leaf for _, leaf in out_flat]
  for key, value in flat.items():
    if key not in index:
      raise ValueError(f"{what}: tensor {key!r} has no place in this model; it was saved "
                       "for a different model or PEFT config")
    old = leaves[index[key]]
    if tuple(old.shape) != tuple(np.shape(value)):
      raise ValueError(f"{what}: tensor {key!r} has shape {tuple(np.shape(value))} but the "
                       f"model expects {tuple(old.shape)}")
    leaves[index[key]] = jnp.asarray(value, dtype=old.dtype)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def save_adapters(path: str, params: Any, trainable: PathFn, meta: dict[str, str]) -> int:
  """Writes only the trainable tensors (adapters + head) as safetensors; returns the count."""
  from safetensors.numpy import save_file
  yes, _ = split_by(jax.device_get(params), trainable)
  save_file({k: np.ascontiguousarray(v) for k, v in yes.items()}, path, metadata=meta)
  return sum(int(np.prod(v.shape)) for v in yes.values())


def load_adapters(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  from safetensors import safe_open
  with safe_open(path, framework="numpy") as f:
    meta = f.metadata() or {}
    return {k: f.get_tensor(k) for k in f.keys()}, meta
