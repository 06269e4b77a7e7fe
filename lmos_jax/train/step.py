"""The train and eval steps: pure functions `(state, batch) -> (state, metrics)` under jit.

State is a plain dict {step, params, opt_state, rng}; params are a pure dict of arrays that
`nnx.merge(graphdef, params)` turns back into the model inside the step. Shardings come from
the params' logical axis names; optimizer moments get the sharding of their param.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmos_jax.parallel.sharding import batch_sharding, constrain, state_shardings
from lmos_jax.train.optim import decay_mask_fn, l2_penalty
from lmos_jax.tree import path_names
from lmos_jax.train.precision import Policy, cast_floats, matmul_precision

Array = jax.Array
LossFn = Callable[[Any, dict, Array | None], tuple[Array, Array, dict]]


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Everything static the step closes over."""

  graphdef: Any
  tx: optax.GradientTransformation
  loss_fn: LossFn
  policy: Policy
  microbatches: int = 1
  l2: float = 0.0
  decay_embeddings: bool = False
  decay_norms_and_biases: bool = False
  schedule: Callable | None = None
  trainable: Callable[[tuple[str, ...]], bool] | None = None  # PEFT: grads only for these
  flat_allreduce_mesh: Mesh | None = None  # set by jit_train_step; see flat_allreduce_grads
  # ZeRO-1 (mesh.opt_state): per param, where its update runs, and where the params live
  update_shardings: Any = None
  param_shardings: Any = None


def opt_state_shardings(abstract_opt_state: Any, param_shardings: dict, mesh: Mesh) -> Any:
  """Each optimizer leaf takes the sharding of the param whose path it ends with.

  `jax.jit(tx.init)` would otherwise return replicated moments under Auto axes.
  """
  by_path = {}
  flat, _ = jax.tree_util.tree_flatten_with_path(param_shardings)
  for path, sh in flat:
    by_path[path_names(path)] = sh
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    names = path_names(path)
    for start in range(len(names)):
      sh = by_path.get(names[start:])
      if sh is not None and len(sh.spec) <= len(leaf.shape):
        return sh
    return replicated
  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def update_shardings_for(param_shardings: dict, abstract_params: dict, mesh: Mesh) -> dict:
  """Where each param's optimizer state and update live when they are sharded (ZeRO stage 1).

  A param replicated over the data axis gets its first dimension that the data axis divides
  split over it; its Adam moments live there and each data device updates only that part,
  after which the params are gathered back to every device. On a data-only CPU mesh this
  halves (for 2 devices) the memory-bound AdamW pass that every device otherwise repeats
  over all params. Params already sharded (fsdp, tensor) and those no dimension of which the
  data axis divides keep their own sharding.
  """
  n = dict(mesh.shape).get("data", 1)

  def one(sh: NamedSharding, leaf) -> NamedSharding:
    if n < 2 or any(axis is not None for axis in sh.spec):
      return sh
    for i, size in enumerate(leaf.shape):
      if size % n == 0:
        return NamedSharding(mesh, P(*([None] * i + ["data"])))
    return sh
  return jax.tree.map(one, param_shardings, abstract_params)


def abstract_model_state(make_model: Callable[[nnx.Rngs], nnx.Module]):
  """graphdef and abstract (shape-only) state of a model, without allocating it."""
  abstract = nnx.eval_shape(lambda: make_model(nnx.Rngs(0)))
  return nnx.split(abstract)


def param_shardings_for(abstract_state, mesh: Mesh) -> dict:
  return nnx.to_pure_dict(state_shardings(abstract_state, mesh))


def train_state_layout(make_model: Callable[[nnx.Rngs], nnx.Module],
                       tx: optax.GradientTransformation, policy: Policy, mesh: Mesh,
                       shard_updates: bool = False):
  """(graphdef, init_fn, abstract state, shardings, update shardings or None) without
  allocating anything. `shard_updates`: the optimizer state follows `update_shardings_for`.

  The rng is raw uint32 key data (`jax.random.PRNGKey`) so checkpoints store it as an array.
  """
  graphdef, abstract_state = abstract_model_state(make_model)
  p_sh = param_shardings_for(abstract_state, mesh)
  u_sh = (update_shardings_for(p_sh, nnx.to_pure_dict(abstract_state), mesh)
          if shard_updates else None)

  def train_state(params, k_train):
    params = cast_floats(params, policy.param_dtype)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": tx.init(params), "rng": k_train}

  def init(key):
    k_params, k_train = jax.random.split(key)
    _, state = nnx.split(make_model(nnx.Rngs(params=k_params)))
    return train_state(nnx.to_pure_dict(state), k_train)

  # from the model's abstract state: tracing `init` would build the model once more
  key_spec = jax.eval_shape(jax.random.PRNGKey, 0)
  abstract = jax.eval_shape(train_state, nnx.to_pure_dict(abstract_state), key_spec)
  shardings = {"step": NamedSharding(mesh, P()), "params": p_sh,
               "opt_state": opt_state_shardings(abstract["opt_state"],
                                                p_sh if u_sh is None else u_sh, mesh),
               "rng": NamedSharding(mesh, P())}
  return graphdef, init, abstract, shardings, u_sh


def init_train_state(make_model: Callable[[nnx.Rngs], nnx.Module],
                     tx: optax.GradientTransformation, policy: Policy, mesh: Mesh, seed: int):
  """Initialises params and optimizer state directly into their shardings (jit from abstract)."""
  graphdef, init, _, shardings, _ = train_state_layout(make_model, tx, policy, mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))
  return graphdef, state, shardings


def _microbatch(x: Array, k: int) -> Array:
  """(B, ...) -> (k, B/k, ...) taking rows i::k, so each microbatch stays evenly sharded."""
  b = x.shape[0]
  y = x.reshape(b // k, k, *x.shape[1:])
  y = jnp.swapaxes(y, 0, 1)
  return constrain(y, (None, "batch") + (None,) * (x.ndim - 1))


def split_trainable(params, trainable: Callable | None):
  """(differentiated leaves, join) so frozen params get no backward pass at all.

  `join(train_leaves, fill)` rebuilds the full tree, frozen leaves from `fill(leaf)`.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  is_train = [trainable is None or trainable(path_names(p)) for p, _ in flat]
  leaves = [x for _, x in flat]

  def join(train_leaves, fill):
    it = iter(train_leaves)
    return jax.tree_util.tree_unflatten(
        treedef, [next(it) if t else fill(x) for t, x in zip(is_train, leaves)])
  return [x for t, x in zip(is_train, leaves) if t], join


def loss_and_grads(cfg: StepConfig, params, batch: dict, rng: Array | None):
  """Sum-loss, weight and grads over the whole batch, accumulated over microbatches.

  With `cfg.trainable` only the trainable leaves are differentiated; frozen ones get
  zero gradients (never read: the optimizer maps them to set_to_zero).
  """
  if cfg.trainable is not None:
    train_leaves, join = split_trainable(params, cfg.trainable)
    # Frozen leaves enter as closed-over constants: no cotangents are computed for them.
    build = lambda tl: join(tl, lambda x: x)  # noqa: E731
    loss_sum, weight, aux, g_leaves = _loss_and_grads(cfg, build, train_leaves, batch, rng)
    return loss_sum, weight, aux, join(g_leaves, jnp.zeros_like)
  return _loss_and_grads(cfg, lambda q: q, params, batch, rng)


def _loss_and_grads(cfg: StepConfig, build: Callable, params, batch: dict, rng: Array | None):
  """Grads with respect to `params`; `build(params)` gives the model's full param tree."""

  def sum_loss(p, mb, key):
    model = nnx.merge(cfg.graphdef, cast_floats(build(p), cfg.policy.compute_dtype))
    with matmul_precision(cfg.policy):
      loss_sum, weight, aux = cfg.loss_fn(model, mb, key)
    return loss_sum.astype(jnp.float32), (weight, aux)

  grad_fn = jax.value_and_grad(sum_loss, has_aux=True)
  if cfg.microbatches == 1:
    (loss_sum, (weight, aux)), grads = grad_fn(params, batch, rng)
    return loss_sum, weight, aux, grads

  mbs = jax.tree.map(lambda x: _microbatch(x, cfg.microbatches), batch)
  keys = None if rng is None else jax.random.split(rng, cfg.microbatches)
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  abstract_aux = jax.eval_shape(
      lambda: sum_loss(params, jax.tree.map(lambda x: x[0], mbs),
                       None if keys is None else keys[0])[1][1])
  init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
          jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_aux), zeros)

  def body(carry, xs):
    mb, key = xs
    (l, (w, a)), g = grad_fn(params, mb, key)
    acc_l, acc_w, acc_a, acc_g = carry
    acc_g = jax.tree.map(lambda s, x: s + x.astype(jnp.float32), acc_g, g)
    acc_a = jax.tree.map(jnp.add, acc_a, a)
    return (acc_l + l, acc_w + w, acc_a, acc_g), None

  (loss_sum, weight, aux, grads), _ = jax.lax.scan(body, init, (mbs, keys))
  return loss_sum, weight, aux, grads


def wants_flat_allreduce(cfg: StepConfig, mesh: Mesh) -> bool:
  """CPU data-only meshes of 2+ devices with every param trained: see flat_allreduce_grads.

  Accelerators keep XLA's own collectives (their combined all-reduce is one kernel), and
  PEFT keeps them too (its frozen params would add zeros to the flat buffer).
  """
  shape = dict(mesh.shape)
  return (mesh.devices.flat[0].platform == "cpu" and shape.get("data", 1) > 1
          and shape.get("fsdp", 1) == 1 and shape.get("tensor", 1) == 1
          and cfg.trainable is None)


def flat_allreduce_grads(cfg: StepConfig, params, batch: dict, rng: Array | None):
  """Per-shard loss and grads summed over the data axis by one all-reduce of a flat buffer.

  XLA:CPU runs a combined all-reduce as one rendezvous per gradient leaf, and each rendezvous
  synchronises every device; one flat psum synchronises them once. Each shard draws its
  dropout from the step key folded with its index.
  """
  mesh = cfg.flat_allreduce_mesh

  def local(p, b, key):
    if key is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index("data"))
    out = loss_and_grads(cfg, p, b, key)
    flat, unravel = jax.flatten_util.ravel_pytree(out)
    return unravel(jax.lax.psum(flat, "data"))

  batch_specs = jax.tree.map(lambda x: P("data"), batch)
  # check_vma=False: grads of the replicated params stay per-shard inside (no implicit psum
  # per leaf); the one psum above makes every output equal on all shards.
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), batch_specs, P()), out_specs=P(),
                       check_vma=False)(params, batch, rng)


def train_step(cfg: StepConfig, state: dict, batch: dict) -> tuple[dict, dict]:
  """One optimizer update on a global batch. Pure: same inputs, same outputs."""
  rng, step_key = jax.random.split(state["rng"])
  params = state["params"]
  grads_fn = loss_and_grads if cfg.flat_allreduce_mesh is None else flat_allreduce_grads
  loss_sum, weight, aux, grads = grads_fn(cfg, params, batch, step_key)
  denom = jnp.maximum(weight, 1.0)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
  loss = loss_sum / denom
  if cfg.l2 > 0:
    mask_fn = decay_mask_fn(cfg.decay_embeddings, cfg.decay_norms_and_biases)
    l2_loss, l2_grads = jax.value_and_grad(lambda p: cfg.l2 * l2_penalty(p, mask_fn))(params)
    grads = jax.tree.map(jnp.add, grads, l2_grads)
    loss = loss + l2_loss
  # Non-finite guard: a NaN/Inf loss or gradient skips the update under `lax.cond`, keeping
  # the old params and optimizer state (the step counter and RNG still advance, so the next
  # batch is a fresh one). One scalar decides it: the global grad norm is non-finite iff some
  # gradient is (or their squares overflow f32), so no per-leaf checks or selects are needed.
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(operands):
    p, o = operands
    g = grads
    if cfg.update_shardings is not None:  # ZeRO-1: each data device updates its part
      g = jax.lax.with_sharding_constraint(g, cfg.update_shardings)
      p = jax.lax.with_sharding_constraint(p, cfg.update_shardings)
    updates, o = cfg.tx.update(g, o, p)
    p = optax.apply_updates(p, updates)
    if cfg.param_shardings is not None:
      p = jax.lax.with_sharding_constraint(p, cfg.param_shardings)
    return p, o

  params, opt_state = jax.lax.cond(finite, update, lambda ops: ops,
                                   (params, state["opt_state"]))
  metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": weight,
             "accuracy": aux.get("correct", 0.0) / denom,
             "nonfinite": 1.0 - finite.astype(jnp.float32)}
  if cfg.schedule is not None:
    metrics["lr"] = cfg.schedule(state["step"])
  new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": rng}
  return new_state, metrics


def eval_step(cfg: StepConfig, params, batch: dict) -> dict:
  """Sums of loss and weight over one batch (averaged by the caller over many batches)."""
  model = nnx.merge(cfg.graphdef, cast_floats(params, cfg.policy.compute_dtype))
  with matmul_precision(cfg.policy):
    loss_sum, weight, aux = cfg.loss_fn(model, batch, None)
  return {"loss_sum": loss_sum, "weight": weight, "correct": aux.get("correct", 0.0)}


def train_steps(cfg: StepConfig, state: dict, batches: dict) -> tuple[dict, dict]:
  """`k` train_steps in one call over batches stacked on a leading axis of size k.

  Metrics come back stacked (k,). The same updates as k calls of train_step; what it saves
  is the host's per-call work (the CPU client dispatches every state array of every device,
  on a core the devices need) for small models.
  """
  return jax.lax.scan(lambda s, b: train_step(cfg, s, b), state, batches)


def stacked_batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding of `k` stacked batches (k, batch, ...): the batch axis split as usual."""
  return NamedSharding(mesh, P(None, *batch_sharding(mesh, ndim - 1).spec))


def jit_train_step(cfg: StepConfig, state_shardings: dict, mesh: Mesh, batch_ndims: dict,
                   flat_allreduce: bool = True, steps_per_call: int = 1):
  """train_step under jit with explicit in/out shardings and the state donated.

  steps_per_call > 1: train_steps instead, taking batches stacked (k, batch, ...) (`batch_ndims`
  are the ranks of one step's arrays).
  """
  if flat_allreduce and wants_flat_allreduce(cfg, mesh):
    cfg = dataclasses.replace(cfg, flat_allreduce_mesh=mesh)
  stacked = steps_per_call > 1
  b_sh = {k: stacked_batch_sharding(mesh, nd + 1) if stacked else batch_sharding(mesh, nd)
          for k, nd in batch_ndims.items()}
  return jax.jit(functools.partial(train_steps if stacked else train_step, cfg),
                 in_shardings=(state_shardings, b_sh),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=0)


def jit_eval_step(cfg: StepConfig, param_shardings: dict, mesh: Mesh, batch_ndims: dict):
  b_sh = {k: batch_sharding(mesh, nd) for k, nd in batch_ndims.items()}
  return jax.jit(lambda p, b: eval_step(cfg, p, b), in_shardings=(param_shardings, b_sh),
                 out_shardings=NamedSharding(mesh, P()))
