"""Task losses: each returns (sum of per-example losses, sum of weights, extra metrics).

Returning sums (not means) makes gradient accumulation exact: the step divides once by
the total weight of the whole batch, whatever the microbatch split or padding.

`label_smoothing` smooths the targets of each loss; `lmos train` asks for it in
training only (`assemble.loss_for_task`).
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


def cross_entropy(logits_NC: Array, labels_N: Array, label_smoothing: float = 0.0) -> Array:
  """Cross-entropy of each row against its integer label, the target smoothed toward uniform
  as optax.smooth_labels smooths a one-hot ((1 - a) one-hot + a / C), without building the
  one-hot (an LM's would be batch x positions x vocabulary): (1 - a) x the label's negative
  log-likelihood + a x the mean negative log-likelihood over the C classes. Float32."""
  logits_NC = logits_NC.astype(jnp.float32)
  nll_N = optax.softmax_cross_entropy_with_integer_labels(logits_NC, labels_N)
  if not label_smoothing:
    return nll_N
  uniform_N = jax.nn.logsumexp(logits_NC, axis=-1) - logits_NC.mean(axis=-1)
  return (1.0 - label_smoothing) * nll_N + label_smoothing * uniform_N


def lm_loss(model, batch: dict[str, Array], rng: Array | None, label_smoothing: float = 0.0):
  """Next-token cross-entropy; `weights` (optional) masks padding and packing gaps."""
  logits_BTV = model(batch["inputs"], **model_inputs(batch), rng=rng)
  losses_BT = cross_entropy(logits_BTV, batch["targets"], label_smoothing)
  weights_BT = batch.get("weights")
  if weights_BT is None:
    weights_BT = jnp.ones_like(losses_BT)
  correct = (jnp.argmax(logits_BTV, -1) == batch["targets"]) * weights_BT
  return (losses_BT * weights_BT).sum(), weights_BT.sum(), {"correct": correct.sum()}


def mlm_loss(model, batch: dict[str, Array], rng: Array | None, label_smoothing: float = 0.0):
  """Masked-LM cross-entropy over the chosen positions only (`weights` = 1 where masked).

  Batch: `inputs` (masked ids), `targets` (original ids), `weights`, and optionally
  `token_type_ids` and `attention_mask` (1 token / 0 padding), as the MLM pipeline emits.
  """
  logits_BTV = model(batch["inputs"], **model_inputs(batch), rng=rng)
  losses_BT = cross_entropy(logits_BTV, batch["targets"], label_smoothing)
  weights_BT = batch["weights"].astype(jnp.float32)
  correct = (jnp.argmax(logits_BTV, -1) == batch["targets"]) * weights_BT
  return (losses_BT * weights_BT).sum(), weights_BT.sum(), {"correct": correct.sum()}


def cls_loss(model, batch: dict[str, Array], rng: Array | None, label_smoothing: float = 0.0):
  """Sequence-classification cross-entropy, one weight per example (0 for padding rows).

  Batch: `inputs` (B, T) ids, `labels` (B,), optional `token_type_ids`, `attention_mask`,
  `weights`. Same contract as lm_loss: (loss sum, weight sum, {"correct": count}).
  """
  logits_BC = model(batch["inputs"], **model_inputs(batch), rng=rng)
  losses_B = cross_entropy(logits_BC, batch["labels"], label_smoothing)
  weights_B = batch.get("weights")
  weights_B = jnp.ones_like(losses_B) if weights_B is None else weights_B.astype(jnp.float32)
  correct = (jnp.argmax(logits_BC, -1) == batch["labels"]) * weights_B
  return (losses_B * weights_B).sum(), weights_B.sum(), {"correct": correct.sum()}
