"""Knowledge distillation (Hinton et al. 2015): T²·KL(teacher_T || student_T) mixed with the
hard-label loss, α·distill + (1-α)·CE. Teacher logits ride in the batch
(`teacher_logits`, computed by a separate compiled teacher forward), so the student step
stays a plain `(state, batch) -> state` step with sum-reductions like `lm_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def kd_terms(student_BTV: Array, teacher_BTV: Array, temperature: float) -> Array:
  """Per-token T²·KL(softmax(t/T) || softmax(s/T)); exactly zero when the logits are equal."""
  t = temperature
  log_p_t = jax.nn.log_softmax(teacher_BTV.astype(jnp.float32) / t, axis=-1)
  log_p_s = jax.nn.log_softmax(student_BTV.astype(jnp.float32) / t, axis=-1)
  return (t * t) * jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)


def distill_loss(temperature: float = 2.0, alpha: float = 0.5):
  """A task loss (model, batch, rng) -> (sum, weight, aux) for `train_step`."""
  if temperature <= 0 or not 0.0 <= alpha <= 1.0:
    raise ValueError(f"distillation needs temperature > 0 and 0 <= alpha <= 1, got "
                     f"T={temperature}, alpha={alpha}")

  def loss_fn(model, batch: dict, rng):
    logits = model(batch["inputs"], rng=rng)
    kd = kd_terms(logits, batch["teacher_logits"], temperature)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         batch["targets"])
    w = batch.get("weights", jnp.ones_like(ce))
    loss = alpha * kd + (1.0 - alpha) * ce
    return (loss * w).sum(), w.sum(), {"kd": (kd * w).sum(), "ce": (ce * w).sum()}
  return loss_fn
