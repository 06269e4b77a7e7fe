"""Meshes and the one table of logical-axis rules.

Every parameter and key activation names its axes logically ("embed", "mlp", "heads"...);
`LOGICAL_AXIS_RULES` below is the only place that says which mesh axis each name maps to.
Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer
state sharded: the modern parameter server), `tensor` (Megatron-style model parallel).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lmos_jax.config.loading import resolve_mesh_shape
from lmos_jax.config.schema import MESH_AXES


# logical name -> mesh axis (or tuple of axes, or None for replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("pos", None),
    ("types", None),
    ("labels", None),
    ("lora_rank", None),
    ("adapter", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
)


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types, so logical constraints apply."""
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(*shape, len(devices))
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
  except (TypeError, ValueError):  # device lists that make_mesh cannot lay out physically
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh_shape: dict[str, int] | None = None,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> P:
  """PartitionSpec for logical names; a mesh axis is used once and only where it divides.

  Dropping an axis that does not divide a dimension (e.g. 2 kv heads over tensor=4) only
  replicates that dimension: it costs memory, never changes results.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
    target = table[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    kept = []
    for ax in axes:
      if ax in used:
        continue
      size = 1 if mesh_shape is None else mesh_shape.get(ax, 1)
      dim = None if shape is None else shape[i]
      prod = math.prod(mesh_shape.get(a, 1) for a in kept) * size if mesh_shape else size
      if mesh_shape is not None and (size == 1 or (dim is not None and dim % prod)):
        continue
      kept.append(ax)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names under the current mesh; a no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) or mesh.manual_axes:
    return x  # no mesh, or inside shard_map (per-shard code has no global layout to pin)
  spec = logical_to_spec(names, x.shape, dict(mesh.shape))
  return jax.lax.with_sharding_constraint(x, spec)


def variable_names(variable: Any) -> tuple[str | None, ...] | None:
  """The logical axis names an nnx Variable was created with (None when it has none)."""
  meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  names = meta.get("out_sharding", meta.get("sharding"))
  return tuple(names) if names is not None else None


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedSharding for every leaf of an nnx State, from its variables' logical names."""
  from flax import nnx

  mesh_shape = dict(mesh.shape)

  def one(variable):
    value = variable.get_value() if hasattr(variable, "get_value") else variable
    names = variable_names(variable)
    if names is None or len(names) != len(value.shape):
      spec = P()
    else:
      spec = logical_to_spec(names, value.shape, mesh_shape)
    return variable.replace(NamedSharding(mesh, spec))

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_like(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying target shardings: what a restore should produce, or the
  state argument to lower a step for ahead of time."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Batches split on their leading axis over data and fsdp."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1),
                                              None, None))
