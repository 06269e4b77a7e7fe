"""The optimizer: optax schedules, AdamW with a weight-decay mask, global-norm clipping,
layer-wise lr decay.

Frozen parameters (PEFT, layer freezing) go through `optax.partition` with `set_to_zero`,
so they hold no Adam moments at all (`optax.masked` would still allocate them).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from lmos_jax.config.loading import ConfigError
from lmos_jax.config.schema import CHOICES
from lmos_jax.tree import path_names

SCHEDULES = CHOICES["train.schedule"]

PathFn = Callable[[tuple[str, ...]], bool]


def make_schedule(t) -> optax.Schedule:
  """LR schedule from the `train` config block; every kind warms up linearly first."""
  lr, steps, warm = t.lr, t.steps, min(t.warmup_steps, t.steps)
  end = lr * t.min_lr_ratio
  warmup = optax.linear_schedule(0.0, lr, max(warm, 1))
  rest = max(steps - warm, 1)
  if t.schedule == "constant":
    tail = optax.constant_schedule(lr)
  elif t.schedule == "warmup_cosine":
    tail = optax.cosine_decay_schedule(lr, rest, alpha=t.min_lr_ratio)
  elif t.schedule == "warmup_linear":
    tail = optax.linear_schedule(lr, end, rest)
  elif t.schedule == "rsqrt":
    base = max(warm, 1)
    tail = lambda s: lr * jax.numpy.sqrt(base / (jax.numpy.maximum(s, 0) + base))  # noqa: E731
  elif t.schedule == "lr_range":  # a sweep, not a training schedule: no warmup of its own
    lo = lr * t.min_lr_ratio
    return lambda s: lo * (lr / lo) ** (jax.numpy.minimum(s, steps - 1) / max(steps - 1, 1))
  elif t.schedule == "wsd":
    decay = max(int(round(t.decay_fraction * steps)), 1)
    stable = max(rest - decay, 0)
    tail = optax.join_schedules(
        [optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay)], [stable])
  else:
    raise ConfigError(f"config 'train.schedule'={t.schedule!r}: expected one of "
                      f"{', '.join(SCHEDULES)}")
  if warm == 0:
    return tail
  return optax.join_schedules([warmup, tail], [warm])



def is_norm_or_bias(names: tuple[str, ...]) -> bool:
  return names[-1] == "bias" or any("norm" in n for n in names)


def is_embedding(names: tuple[str, ...]) -> bool:
  return names[-1] in ("embed", "pos_embed", "type_embed") or "embeddings" in names


def decay_mask_fn(decay_embeddings: bool, decay_norms_and_biases: bool) -> Callable:
  """Callable mask for AdamW: True where weight decay applies."""
  def decays(names: tuple[str, ...]) -> bool:
    if is_norm_or_bias(names):
      return decay_norms_and_biases
    if is_embedding(names):
      return decay_embeddings
    return True

  def mask(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: decays(path_names(p)), params)
  return mask


def layer_depth(names: tuple[str, ...], num_layers: int) -> int | None:
  """Depth of a param for layer-wise lr decay: 0 the embeddings (and their norm), i + 1 for
  block i of an unrolled stack, None for a stacked block leaf (its leading axis is the
  layer), num_layers + 1 for the rest (final norm, pooler, heads)."""
  if "blocks" in names:
    i = names.index("blocks")
    index = names[i + 1] if i + 1 < len(names) else ""
    return int(index) + 1 if index.isdigit() else None
  if is_embedding(names) or names[0] == "embed_norm":
    return 0
  return num_layers + 1


def scale_by_layer_decay(decay: float, num_layers: int) -> optax.GradientTransformation:
  """Layer-wise lr decay (ULMFiT's discriminative fine-tuning; ELECTRA, BEiT): a param at
  depth d (`layer_depth`) has its update scaled by decay**(num_layers + 1 - d).

  Why: finetuning a pretrained encoder briefly should move its lower layers, which hold the
  most general features, less than the top ones and the fresh head. Applied after AdamW, so
  a layer's weight decay shrinks with its lr, as with a per-layer lr. Stacked (scanned)
  block leaves get one factor per slice of their leading axis.
  """
  top = num_layers + 1

  def scale(path, u):
    depth = layer_depth(path_names(path), num_layers)
    if depth is not None:
      return u * jax.numpy.asarray(decay ** (top - depth), u.dtype)
    by_layer = decay ** (top - 1 - jax.numpy.arange(u.shape[0]))
    return u * by_layer.reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype)

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(t, trainable: PathFn | None = None,
                   schedule: optax.Schedule | None = None,
                   num_layers: int = 0) -> optax.GradientTransformation:
  """Clip -> AdamW(schedule, decay mask) -> layer-wise lr decay (`t.layer_decay` < 1, over
  `num_layers` blocks); params where `trainable(path)` is False are frozen.

  `schedule` is the run's lr schedule (`make_schedule(t)` when not given), so the step can
  report the very lr the optimizer follows (the top layers' and the heads').
  """
  parts = []
  if t.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(t.grad_clip))
  schedule = make_schedule(t) if schedule is None else schedule
  parts.append(optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps,
                           weight_decay=t.weight_decay,
                           mask=decay_mask_fn(t.decay_embeddings, t.decay_norms_and_biases)))
  if t.get("layer_decay", 1.0) < 1:
    if num_layers < 1:
      raise ConfigError("config 'train.layer_decay' < 1 needs the model's layer count; "
                        "make_optimizer(..., num_layers=cfg.model.num_layers)")
    parts.append(scale_by_layer_decay(t.layer_decay, num_layers))
  tx = optax.chain(*parts)
  return tx if trainable is None else train_only(tx, trainable)


def train_only(tx: optax.GradientTransformation,
               trainable: PathFn) -> optax.GradientTransformation:
  """`tx` on the params whose path `trainable` accepts; the others get zero updates and no
  optimizer state (a PEFT run keeps no Adam moments for the frozen base)."""
  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "train" if trainable(path_names(p)) else "frozen", params)
  return optax.partition({"train": tx, "frozen": optax.set_to_zero()}, labels)


def l2_penalty(params: Any, mask_fn: Callable) -> jax.Array:
  """0.5 * sum of squares over the params the decay mask selects (classic L2 in the loss)."""
  mask = mask_fn(params)
  sq = jax.tree.map(lambda p, m: (p.astype("float32") ** 2).sum() if m else 0.0, params, mask)
  return 0.5 * sum(jax.tree.leaves(sq))
