"""Task losses: each returns (sum of per-example losses, sum of weights, extra metrics).

Returning sums (not means) makes gradient accumulation exact: the step divides once by
the total weight of the whole batch, whatever the microbatch split or padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

# Batch keys -> the model's keyword (Hugging Face names; GPT and BERT take the same set).
MODEL_INPUTS = (("attention_mask", "attention_mask"), ("positions", "position_ids"),
                ("token_type_ids", "token_type_ids"), ("segment_ids", "segment_ids"))


def model_inputs(batch: dict[str, Array]) -> dict[str, Array]:
  """The keyword inputs a batch carries besides `inputs` (absent keys are left out)."""
  return {kw: batch[key] for key, kw in MODEL_INPUTS if key in batch}


def lm_loss(model, batch: dict[str, Array], rng: Array | None):
  """Next-token cross-entropy; `weights` (optional) masks padding and packing gaps."""
  logits_BTV = model(batch["inputs"], **model_inputs(batch), rng=rng)
  losses_BT = optax.softmax_cross_entropy_with_integer_labels(
      logits_BTV.astype(jnp.float32), batch["targets"])
  weights_BT = batch.get("weights")
  if weights_BT is None:
    weights_BT = jnp.ones_like(losses_BT)
  correct = (jnp.argmax(logits_BTV, -1) == batch["targets"]) * weights_BT
  return (losses_BT * weights_BT).sum(), weights_BT.sum(), {"correct": correct.sum()}


def mlm_loss(model, batch: dict[str, Array], rng: Array | None):
  """Masked-LM cross-entropy over the chosen positions only (`weights` = 1 where masked).

  Batch: `inputs` (masked ids), `targets` (original ids), `weights`, and optionally
  `token_type_ids` and `attention_mask` (1 token / 0 padding), as the MLM pipeline emits.
  """
  logits_BTV = model(batch["inputs"], **model_inputs(batch), rng=rng)
  losses_BT = optax.softmax_cross_entropy_with_integer_labels(
      logits_BTV.astype(jnp.float32), batch["targets"])
  weights_BT = batch["weights"].astype(jnp.float32)
  correct = (jnp.argmax(logits_BTV, -1) == batch["targets"]) * weights_BT
  return (losses_BT * weights_BT).sum(), weights_BT.sum(), {"correct": correct.sum()}


def cls_loss(model, batch: dict[str, Array], rng: Array | None):
  """Sequence-classification cross-entropy, one weight per example (0 for padding rows).

  Batch: `inputs` (B, T) ids, `labels` (B,), optional `token_type_ids`, `attention_mask`,
  `weights`. Same contract as lm_loss: (loss sum, weight sum, {"correct": count}).
  """
  logits_BC = model(batch["inputs"], **model_inputs(batch), rng=rng)
  losses_B = optax.softmax_cross_entropy_with_integer_labels(
      logits_BC.astype(jnp.float32), batch["labels"])
  weights_B = batch.get("weights")
  weights_B = jnp.ones_like(losses_B) if weights_B is None else weights_B.astype(jnp.float32)
  correct = (jnp.argmax(logits_BC, -1) == batch["labels"]) * weights_B
  return (losses_B * weights_B).sum(), weights_B.sum(), {"correct": correct.sum()}
