"""From a validated config to the train step, without allocating anything.

The (PEFT-wrapped) model recipe, the loss of the task, the optimizer around the one lr
schedule, the precision policy and the sharded state layout. `lmos train`
(`trainer.build_run`) and `lmos plan` (`plan.build_step`) both call `assemble_step`, so the
step the planner compiles is the step training runs.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from flax import nnx
from jax.sharding import Mesh

from lmos_jax.config.loading import ConfigError
from lmos_jax.config.schema import CHOICES
from lmos_jax.models.factory import model_factory
from lmos_jax.peft import methods as peft
from lmos_jax.train.losses import cls_loss, lm_loss, mlm_loss
from lmos_jax.train.optim import make_optimizer, make_schedule
from lmos_jax.train.precision import resolve_policy
from lmos_jax.train.sparse_quant import run_layouts, wants_kernels, with_pruning, with_qat
from lmos_jax.train.step import (LossFn, StepConfig, abstract_model_state,
                                 train_state_layout)


class StepAssembly(NamedTuple):
  """A run's step and state layout; nothing is allocated or compiled."""

  graphdef: Any
  init_fn: Callable  # PRNGKey -> state; jit it with out_shardings=shardings
  abstract: dict  # the state's shapes and dtypes
  shardings: dict
  step_cfg: StepConfig


def loss_for_task(task: str, label_smoothing: float = 0.0) -> LossFn:
  """The loss of config 'task': next-token (or next-item), masked-token or
  sequence-classification, its targets smoothed by `label_smoothing` in training only (the
  step passes a dropout key; eval passes None and reports the plain cross-entropy, so eval
  losses compare across runs with and without it, as PEFT's training-only penalty does)."""
  # rec: the recommender's logits are over items, and the next item is the target
  losses = {"lm": lm_loss, "mlm": mlm_loss, "cls": cls_loss, "rec": lm_loss}
  if task not in losses:
    raise ConfigError(f"config 'task'={task!r}: expected one of {', '.join(CHOICES['task'])}")
  loss = losses[task]
  if not label_smoothing:
    return loss

  def smoothed_in_training(model, batch, rng):
    return loss(model, batch, rng, label_smoothing=label_smoothing if rng is not None else 0.0)
  return smoothed_in_training


def trainable_for(cfg) -> Callable[[tuple[str, ...]], bool] | None:
  """Which params train: PEFT's choice, and never the recommender's frozen text vectors."""
  trainable = peft.trainable_for(cfg.peft)
  if cfg.model.arch != "rec" or cfg.model.item_repr == "id":
    return trainable
  from lmos_jax.models.rec import FROZEN
  return lambda names: FROZEN not in names and (trainable is None or trainable(names))


def splits_opt_state(cfg, platform: str) -> bool:
  """Whether 2+ data devices split the optimizer state (config 'mesh.opt_state': sharded,
  replicated, or auto: split on accelerators when every param trains).

  ZeRO-1 is for memory: each accelerator keeps 1/data of the moments. CPU devices share one
  host's memory and cores, so auto keeps them replicated there: on 2 per-core CPU devices the
  split made nanoGPT's small shape 1.43x slower a step (36 -> 51 ms, experiments/bench_train.py)
  and the baby shape ~10% slower (1,590 -> 1,420 tokens/s), the extra gathers costing more than
  the halved update saves; MiniLM full finetuning, whose 30k-row embedding makes the update
  large, gained (380 -> 327-365 ms) and can ask for `sharded`. A PEFT run's optimizer state is
  a few percent of the params: gathering its many small updates costs more than the shorter
  update saves (LoRA on MiniLM 113 ms/step replicated, 124 split). The planner's memory model
  asks the same question."""
  mode = cfg.mesh.get("opt_state", "auto")
  return mode == "sharded" or (mode == "auto" and platform != "cpu"
                               and trainable_for(cfg) is None)


def assemble_step(cfg, mesh: Mesh, vocab_size: int, item_text=None) -> StepAssembly:
  """The train step of `cfg` on `mesh` for a tokenizer of `vocab_size` ids (task rec: item
  rows, with `item_text` the encoder's item vectors; None plans with zeros of their shape).

  Frozen params (PEFT, the recommender's text vectors) get no gradients and no optimizer
  state; the lr the step reports is the schedule the optimizer follows (built once). Pruning
  wraps the optimizer (its masks are optimizer state, checkpointed with it); QAT wraps the
  loss (train and eval alike).
  """
  t = cfg.train
  platform = mesh.devices.flat[0].platform
  policy = resolve_policy(t.precision, platform)
  make_model = peft.wrap_factory(model_factory(cfg.model, vocab_size, item_text), cfg.peft)
  trainable = trainable_for(cfg)
  schedule = make_schedule(t)
  tx = peft.peft_optimizer(make_optimizer(t, trainable, schedule, cfg.model.num_layers),
                           cfg.peft, t.steps)
  loss_fn = peft.peft_loss(loss_for_task(cfg.task, t.get("label_smoothing", 0.0)), cfg.peft)
  if wants_kernels(cfg):
    model_def, model_state = abstract_model_state(make_model)
    params_like = nnx.to_pure_dict(model_state)
    layouts = run_layouts(model_def, params_like)
    tx = with_pruning(tx, cfg.prune, layouts, t.steps, params_like)
    loss_fn = with_qat(loss_fn, cfg.quant, model_def, params_like, layouts)
  graphdef, init_fn, abstract, shardings, update_sh = train_state_layout(
      make_model, tx, policy, mesh,
      shard_updates=splits_opt_state(cfg, platform) and dict(mesh.shape).get("data", 1) > 1)
  step_cfg = StepConfig(graphdef=graphdef, tx=tx, trainable=trainable, loss_fn=loss_fn,
                        policy=policy, microbatches=t.microbatches, l2=t.l2,
                        decay_embeddings=t.decay_embeddings,
                        decay_norms_and_biases=t.decay_norms_and_biases, schedule=schedule,
                        update_shardings=update_sh,
                        param_shardings=None if update_sh is None else shardings["params"])
  return StepAssembly(graphdef, init_fn, abstract, shardings, step_cfg)
