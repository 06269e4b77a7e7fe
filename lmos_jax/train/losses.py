"""Task losses: each returns (sum of per-example losses, sum of weights, extra metrics).

Returning sums (not means) makes gradient accumulation exact: the step divides once by
the total weight of the whole batch, whatever the microbatch split or padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def lm_loss(model, batch: dict[str, Array], rng: Array | None):
  """Next-token cross-entropy; `weights` (optional) masks padding and packing gaps."""
  logits_BTV = model(batch["inputs"], positions_BT=batch.get("positions"),
                     segment_ids_BT=batch.get("segment_ids"), rng=rng)
  losses_BT = optax.softmax_cross_entropy_with_integer_labels(
      logits_BTV.astype(jnp.float32), batch["targets"])
  weights_BT = batch.get("weights")
  if weights_BT is None:
    weights_BT = jnp.ones_like(losses_BT)
  correct = (jnp.argmax(logits_BTV, -1) == batch["targets"]) * weights_BT
  return (losses_BT * weights_BT).sum(), weights_BT.sum(), {"correct": correct.sum()}
