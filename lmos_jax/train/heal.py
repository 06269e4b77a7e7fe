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
from lmos_jax.train.optim import train_only
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


LORA_TARGET = r"(attn/(query|key|value|out)|mlp/(up|down))$"


def lora_heal(graphdef, params: dict, data, steps: int, *, rank: int = 8, alpha: float = 16.0,
              lr: float = 1e-3, target: str = LORA_TARGET, seed: int = 0
              ) -> tuple[dict, list[float]]:
  """Heals with LoRA (lmos_jax.peft) on every Dense, then merges it back into the kernels.

  Returns params with the original tree (same graphdef) and the training losses.
  """
  from flax import nnx

  from lmos_jax.peft.lora import apply_lora
  from lmos_jax.peft.methods import merge_and_unload
  from lmos_jax.peft.wrap import trainable_fn

  model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
  apply_lora(model, target, rank, alpha, 0.0, rngs=seed)
  lora_graphdef, lora_state = nnx.split(model)
  tx = train_only(optax.adamw(lr, weight_decay=0.0), trainable_fn("lora", ""))
  trained, losses = finetune(lora_graphdef, nnx.to_pure_dict(lora_state), data, steps, tx=tx,
                             seed=seed)
  model = nnx.merge(lora_graphdef, trained)
  merge_and_unload(model)
  return nnx.to_pure_dict(nnx.split(model)[1]), losses
