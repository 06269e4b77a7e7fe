"""Pruning: exact sparsities, N:M groups, masks that survive AdamW, the cubic schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmos_jax.compress.kernels import KernelLayout
from lmos_jax.compress.prune import (alpha_max_masks, apply_masks, cubic_sparsity,
                                      global_masks, layerwise_masks, masked_pruning,
                                      nm_masks, sparsity_report, total_sparsity)

LAYOUTS = {("blocks", "up", "kernel"): KernelLayout(1, 1),  # stacked: (L, in, out)
           ("head", "kernel"): KernelLayout(0, 1)}


def params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {"blocks": {"up": {"kernel": jax.random.normal(k1, (3, 16, 8)),
                            "bias": jnp.ones((3, 8))}},
          "head": {"kernel": 3.0 * jax.random.normal(k2, (8, 12))},
          "embed": jax.random.normal(k3, (10, 8))}


def test_layerwise_global_and_alpha_rules():
  p = params()
  rows = sparsity_report(apply_masks(p, layerwise_masks(p, LAYOUTS, 0.5)), LAYOUTS)
  assert [r[0] for r in rows] == ["blocks.0.up", "blocks.1.up", "blocks.2.up", "head"]
  assert all(s == 0.5 for _, _, s in rows)  # exact: half of an even count, as a ratio
  g = apply_masks(p, global_masks(p, LAYOUTS, 0.5))
  assert total_sparsity(g, LAYOUTS) == 0.5
  head_sparsity = dict((r[0], r[2]) for r in sparsity_report(g, LAYOUTS))["head"]
  assert head_sparsity < 0.3  # the 3x larger head keeps more under one global threshold
  np.testing.assert_array_equal(np.asarray(g["embed"]), np.asarray(p["embed"]))
  a = alpha_max_masks(p, LAYOUTS, 0.3)
  w = np.asarray(p["blocks"]["up"]["kernel"])
  want = np.abs(w) >= 0.3 * np.abs(w).max(axis=(1, 2), keepdims=True)
  np.testing.assert_array_equal(np.asarray(a["blocks"]["up"]["kernel"]), want)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 8)])
def test_nm_masks_have_exactly_n_per_group(n, m):
  p = params(1)
  masks = nm_masks(p, LAYOUTS, n, m)
  up = np.asarray(masks["blocks"]["up"]["kernel"]).reshape(3, 16 // m, m, 8)
  assert np.all(up.sum(axis=2) == n)
  head = np.asarray(masks["head"]["kernel"]).reshape(8 // m, m, 12)
  assert np.all(head.sum(axis=1) == n)
  kept = np.where(up, np.abs(np.asarray(p["blocks"]["up"]["kernel"])).reshape(up.shape), -1)
  dropped = np.where(~up, np.abs(np.asarray(p["blocks"]["up"]["kernel"])).reshape(up.shape),
                     -1)
  assert np.all(kept.max(2) >= dropped.max(2))  # the largest of each group is kept
  with pytest.raises(ValueError, match="multiple of M"):
    nm_masks(p, LAYOUTS, 2, 3)


def test_pruned_weights_stay_zero_under_adamw_with_weight_decay():
  p = params(2)
  masks = layerwise_masks(p, LAYOUTS, 0.6)
  tx = masked_pruning(optax.adamw(1e-2, weight_decay=0.5), LAYOUTS, masks=masks)
  state = tx.init(p)
  p = apply_masks(p, masks)

  @jax.jit
  def step(p, state, key):
    grads = jax.tree.map(lambda x: jax.random.normal(key, x.shape), p)  # dense gradients
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  start = p
  for i in range(40):
    p, state = step(p, state, jax.random.PRNGKey(i))
  for leaf, m, s in zip(jax.tree.leaves(p), jax.tree.leaves(masks), jax.tree.leaves(start)):
    m = np.broadcast_to(np.asarray(m), leaf.shape)
    assert np.all(np.asarray(leaf)[~m] == 0.0)
    assert np.all(np.asarray(leaf)[m] != np.asarray(s)[m])  # the kept ones did train
  # each layer drops round(0.6 n) of its n weights: within half a weight's share of 0.6
  assert all(abs(s - 0.6) <= 0.5 / n for _, n, s in sparsity_report(p, LAYOUTS))


def test_cubic_schedule_reaches_target_at_end_step():
  begin, end, final = 2, 12, 0.75
  sched = lambda t: cubic_sparsity(t, final, begin, end)  # noqa: E731
  # f32 schedule vs float64 expectations: a few roundings at most (these values are even
  # exact in binary); approx's default rel 1e-6 ~ 8 eps
  assert float(sched(begin)) == 0.0 and float(sched(end)) == pytest.approx(final)
  assert float(sched(7)) == pytest.approx(final * (1 - 0.5 ** 3))
  p = params(3)
  tx = masked_pruning(optax.sgd(1e-2), LAYOUTS, schedule=sched, begin=begin, end=end,
                      update_every=3)
  state = tx.init(p)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  seen = []
  for t in range(end + 3):
    grads = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), p)
    updates, state = step(p, state, grads)
    p = optax.apply_updates(p, updates)
    seen.append(total_sparsity(p, LAYOUTS))
  assert seen == sorted(seen) and seen[begin - 1] == 0.0
  assert 0 < seen[begin + 3] < final
  # a whole count of 96 or 128 weights: 1e-2 is under one weight of the head (1/96) and
  # about one of a 128-weight layer (1/128)
  assert all(abs(s - final) < 1e-2 for _, _, s in sparsity_report(p, LAYOUTS))
