"""Short single-device finetunes after compression (healing, distillation, QAT, pruning).

Reuses the trainer's pure `train_step`; the optimizer and loss are whatever the recipe
needs (e.g. `masked_pruning(adamw)` keeps a pruned model pruned while it heals).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from lmos_jax.train.losses import lm_loss
from lmos_jax.train.precision import Policy
from lmos_jax.train.step import StepConfig, train_step


def finetune(graphdef, params: dict, data, steps: int, *, lr: float = 3e-4,
             tx: optax.GradientTransformation | None = None, loss_fn: Callable = lm_loss,
             batch_fn: Callable[[dict], dict] | None = None, seed: int = 0,
             start_batch: int = 100_000) -> tuple[dict, list[float]]:
  """`steps` updates on data.train_batch(start_batch + i); returns (params, losses)."""
  tx = tx or optax.adamw(lr, weight_decay=0.0)
  cfg = StepConfig(graphdef=graphdef, tx=tx, loss_fn=loss_fn,
                   policy=Policy("fp32", jnp.float32, jnp.float32))
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
           "rng": jax.random.PRNGKey(seed)}
  step_fn = jax.jit(lambda s, b: train_step(cfg, s, b))
  losses = []
  for i in range(steps):
    batch = data.train_batch(start_batch + i)
    if batch_fn is not None:
      batch = batch_fn(batch)
    state, metrics = step_fn(state, batch)
    losses.append(metrics["loss"])
  return state["params"], [float(x) for x in jax.device_get(losses)]
