"""Magnitude pruning: one-shot (layer-wise, global, alpha*max rule), N:M, and gradual.

Masks cover the Dense kernels (see `kernels.py`); every other leaf gets a scalar True.
`masked_pruning` is an optax wrapper whose state holds the masks: it masks the gradients,
runs the inner optimizer, then re-masks the params after the update (returning updates
that land exactly on zero), so momentum and weight decay cannot regrow a pruned weight.
With a sparsity schedule (Zhu & Gupta's cubic one) it recomputes the masks every
`update_every` steps from the current magnitudes, never unpruning a weight.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmos_jax.compress.kernels import KernelLayout, layer_names, to_view
from lmos_jax.tree import key_path

Array = jax.Array
Layouts = dict[tuple, KernelLayout]


def _rank_keep(scores_LN: Array, k_prune: Array) -> Array:
  """True for all but the k_prune lowest scores of each row (exact count, ties by index).

  The ranks invert one stable argsort by a scatter (half the cost of a second argsort,
  which a training step pays at every scheduled mask update)."""
  order = jnp.argsort(scores_LN, axis=-1, stable=True)
  n = scores_LN.shape[-1]
  invert = lambda o: jnp.zeros(n, jnp.int32).at[o].set(jnp.arange(n, dtype=jnp.int32))  # noqa: E731
  ranks = jax.vmap(invert)(order.reshape(-1, n)).reshape(scores_LN.shape)
  return ranks >= k_prune


def _per_kernel(fn: Callable[[Array, KernelLayout], Array], params: dict,
                layouts: Layouts) -> dict:
  """Masks from fn(kernel, layout) (bool, kernel shape); scalar True for other leaves."""
  def one(path, x):
    lay = layouts.get(key_path(path))
    return jnp.ones((), bool) if lay is None else fn(x, lay)
  return jax.tree_util.tree_map_with_path(one, params)


def layerwise_masks(params: dict, layouts: Layouts, sparsity: float | Array) -> dict:
  """Each layer's kernel loses its own `sparsity` share of smallest-magnitude weights."""
  def fn(w, lay):
    v = to_view(w, lay)
    flat = jnp.abs(v).reshape(v.shape[0], -1)
    k = jnp.round(sparsity * flat.shape[1]).astype(jnp.int32)
    return _rank_keep(flat, k).reshape(w.shape)
  return _per_kernel(fn, params, layouts)


def global_masks(params: dict, layouts: Layouts, sparsity: float | Array) -> dict:
  """One magnitude threshold over all kernels together (layers end up unequally sparse).

  Pure jnp (exact count, ties by position), so a training step can recompute it under jit
  with a scheduled `sparsity`."""
  kernels = _kernels(params, layouts)
  mags = jnp.concatenate([jnp.abs(x).reshape(-1).astype(jnp.float32) for _, x in kernels])
  k = jnp.round(sparsity * mags.size).astype(jnp.int32)
  keep = _rank_keep(mags[None], k)[0]
  pieces, start = {}, 0
  for p, x in kernels:
    pieces[p] = keep[start:start + x.size].reshape(x.shape)
    start += x.size
  return _per_kernel_by_path(pieces, params, layouts)


def alpha_max_masks(params: dict, layouts: Layouts, alpha: float) -> dict:
  """W ⊙ (|W| >= α·max|W|), with max taken per layer's kernel."""
  def fn(w, lay):
    v = jnp.abs(to_view(w, lay))
    return (v >= alpha * v.max(axis=(1, 2), keepdims=True)).reshape(w.shape)
  return _per_kernel(fn, params, layouts)


def nm_masks(params: dict, layouts: Layouts, n: int = 2, m: int = 4) -> dict:
  """N:M structured sparsity: in each run of M consecutive inputs (per output), keep N."""
  if not 0 < n <= m:
    raise ValueError(f"N:M pruning needs 0 < N <= M, got {n}:{m}")

  def fn(w, lay):
    v = jnp.abs(to_view(w, lay))
    if v.shape[1] % m:
      raise ValueError(f"N:M pruning with M={m}: a kernel's input size {v.shape[1]} is "
                       f"not a multiple of M; choose M dividing it")
    g = v.reshape(v.shape[0], v.shape[1] // m, m, v.shape[2])
    ranks = jnp.argsort(jnp.argsort(-g, axis=2), axis=2)  # 0 = largest
    return (ranks < n).reshape(w.shape)
  return _per_kernel(fn, params, layouts)


def _kernels(params: dict, layouts: Layouts):
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return [(key_path(p), x) for p, x in flat if key_path(p) in layouts]


def _per_kernel_by_path(pieces: dict, params: dict, layouts: Layouts) -> dict:
  def one(path, x):
    p = key_path(path)
    return jnp.asarray(pieces[p]) if p in pieces else jnp.ones((), bool)
  return jax.tree_util.tree_map_with_path(one, params)


def apply_masks(params: Any, masks: Any) -> Any:
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def cubic_sparsity(step: Array | int, final: float, begin: int, end: int,
                   initial: float = 0.0) -> Array:
  """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3, clamped."""
  frac = jnp.clip((jnp.asarray(step, jnp.float32) - begin) / max(end - begin, 1), 0.0, 1.0)
  return final + (initial - final) * (1.0 - frac) ** 3


class PruningState(NamedTuple):
  inner: Any
  masks: Any
  count: Array


def all_kept(params: dict, layouts: Layouts) -> dict:
  """Masks that prune nothing (the state before the first scheduled prune)."""
  return _per_kernel(lambda w, _: jnp.ones(w.shape, bool), params, layouts)


MaskFn = Callable[[Any, Array], Any]  # (params with pruned weights zeroed, count) -> masks


def masked_pruning(tx: optax.GradientTransformation, layouts: Layouts, *,
                   masks: Any | None = None,
                   schedule: Callable[[Array], Array] | None = None,
                   begin: int = 0, end: int = 0,
                   update_every: int = 1,
                   mask_fn: MaskFn | None = None) -> optax.GradientTransformation:
  """Wraps `tx`: fixed `masks` (one-shot) and/or masks recomputed on updates begin,
  begin+update_every, ... and end (counting the updates this transformation has applied).

  The recomputed masks come from `mask_fn(params, count)`, or with a sparsity `schedule`
  from the layer-wise magnitude rule; they are taken from the params the update starts
  from (what a checkpoint at that step holds), ANDed with the old masks (monotone), and
  applied to this update's gradients and result.
  """
  if mask_fn is None and schedule is not None:
    mask_fn = lambda p, t: layerwise_masks(p, layouts, schedule(t))  # noqa: E731

  def init(params):
    m = all_kept(params, layouts) if masks is None else masks
    return PruningState(tx.init(params), m, jnp.zeros((), jnp.int32))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("masked_pruning needs params in update() to re-mask them")
    new_masks = state.masks
    if mask_fn is not None:
      t = state.count
      due = (t >= begin) & (t <= end) & (((t - begin) % update_every == 0) | (t == end))

      def recompute(_):
        fresh = mask_fn(apply_masks(params, state.masks), t)
        return jax.tree.map(jnp.logical_and, fresh, state.masks)
      new_masks = jax.lax.cond(due, recompute, lambda _: state.masks, None)
    grads = apply_masks(grads, new_masks)
    updates, inner = tx.update(grads, state.inner, params)
    final = apply_masks(optax.apply_updates(params, updates), new_masks)
    updates = jax.tree.map(lambda f, p: (f - p).astype(p.dtype), final, params)
    return updates, PruningState(inner, new_masks, state.count + 1)

  return optax.GradientTransformation(init, update)


def sparsity_report(params: dict, layouts: Layouts) -> list[tuple[str, int, float]]:
  """(layer name, weights, fraction exactly zero) for every layer's kernel."""
  rows = []
  for path, x in _kernels(params, layouts):
    lay = layouts[path]
    v = np.asarray(to_view(jnp.asarray(x), lay)).reshape(
        int(np.prod(x.shape[:lay.batch_ndim])), -1)
    for name, row in zip(layer_names(path, x.shape, lay), v):
      rows.append((name, int(row.size), float(np.mean(row == 0))))
  return rows


def total_sparsity(params: dict, layouts: Layouts) -> float:
  """Share of all kernel weights that are exactly zero (weighted by each layer's size)."""
  rows = sparsity_report(params, layouts)
  return sum(n * s for _, n, s in rows) / max(sum(n for _, n, _ in rows), 1)
