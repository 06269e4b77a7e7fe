"""Pruning and quantization-aware training from the config's `prune` and `quant` blocks.

Pruning is an optax wrapper (`compress.prune.masked_pruning`) around the run's optimizer: the
masks are part of the optimizer state, so every checkpoint carries them and a resume goes on
with the very masks (and schedule position) the run had. QAT wraps the task loss, so the
train step and the eval step both see the fake-quantized kernels. `assemble_step` applies
both, which keeps `lmos train` and `lmos plan` on one step.

Pruning steps count the updates applied, like the optimizer's own count: a step skipped as
non-finite (train.nonfinite=skip) does not advance the schedule.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from lmos_jax.compress.kernels import KernelLayout, kernel_layouts
from lmos_jax.compress.prune import (MaskFn, alpha_max_masks, cubic_sparsity, global_masks,
                                      layerwise_masks, masked_pruning, nm_masks,
                                      total_sparsity)
from lmos_jax.compress.quantize import qat_loss
from lmos_jax.config.loading import ConfigError
from lmos_jax.config.schema import default_prune_end
from lmos_jax.tree import key_path

Layouts = dict[tuple, KernelLayout]
QAT_BITS = {"int8": 8, "int4": 4}


def wants_kernels(cfg) -> bool:
  """Whether the run prunes or fake-quantizes, i.e. needs the Dense kernels' layouts."""
  return cfg.prune.method != "none" or cfg.quant.qat != "none"


def kernel_input_sizes(abstract_params: dict, layouts: Layouts) -> dict[str, int]:
  """'blocks.attn.query.kernel' -> the kernel's input size (what N:M and quantization
  groups must divide), from shapes only."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    lay = layouts.get(key_path(path))
    if lay is not None:
      b = lay.batch_ndim
      out[".".join(map(str, key_path(path)))] = math.prod(x.shape[b:b + lay.in_ndim])
  return out


def check_divides(field: str, size: int, in_sizes: dict[str, int]) -> None:
  """ConfigError naming `field` when `size` does not divide some kernel's input size."""
  bad = {name: n for name, n in in_sizes.items() if size and n % size}
  if bad:
    name, n = next(iter(bad.items()))
    sizes = ", ".join(map(str, sorted(set(in_sizes.values()))))
    raise ConfigError(f"config {field!r}={size} does not divide the input size {n} of "
                      f"{name} ({len(bad)} kernel(s) in all); use a divisor of every "
                      f"kernel's input size ({sizes})")


def prune_window(p, total_steps: int) -> tuple[int, int]:
  """(begin, end) update counts of the mask recomputations; oneshot is begin == end."""
  if p.schedule == "oneshot":
    return p.begin_step, p.begin_step
  return p.begin_step, p.end_step or default_prune_end(total_steps)


def prune_mask_fn(p, layouts: Layouts, total_steps: int) -> MaskFn:
  """The masks of `prune.method` at update count t: the target (sparsity or alpha) times
  the ramp (1 for oneshot; Zhu & Gupta's cubic 0 -> 1 from begin to end for gradual)."""
  begin, end = prune_window(p, total_steps)

  def ramp(t: jax.Array) -> jax.Array:
    if p.schedule == "oneshot":
      return jnp.ones((), jnp.float32)
    return cubic_sparsity(t, 1.0, begin, end)

  rules: dict[str, MaskFn] = {
      "magnitude": lambda w, t: layerwise_masks(w, layouts, p.sparsity * ramp(t)),
      "global": lambda w, t: global_masks(w, layouts, p.sparsity * ramp(t)),
      "alpha": lambda w, t: alpha_max_masks(w, layouts, p.alpha * ramp(t)),
      "nm": lambda w, t: nm_masks(w, layouts, p.n, p.m),
  }
  return rules[p.method]


def with_pruning(tx: optax.GradientTransformation, p, layouts: Layouts, total_steps: int,
                 abstract_params: dict) -> optax.GradientTransformation:
  """`tx` inside the masking wrapper of `prune.method` (tx itself when it is none)."""
  if p.method == "none":
    return tx
  if p.method == "nm":
    check_divides("prune.m", p.m, kernel_input_sizes(abstract_params, layouts))
  begin, end = prune_window(p, total_steps)
  return masked_pruning(tx, layouts, mask_fn=prune_mask_fn(p, layouts, total_steps),
                        begin=begin, end=end, update_every=p.update_every)


def with_qat(loss_fn: Callable, q, graphdef: Any, abstract_params: dict,
             layouts: Layouts) -> Callable:
  """`loss_fn` on the model with fake-quantized Dense kernels (itself when qat is none)."""
  if q.qat == "none":
    return loss_fn
  check_divides("quant.group_size", q.group_size, kernel_input_sizes(abstract_params, layouts))
  return qat_loss(loss_fn, graphdef, abstract_params, QAT_BITS[q.qat], q.group_size)


def run_layouts(graphdef: Any, abstract_params: dict) -> Layouts:
  """The Dense kernels' layouts of the run's model (from shapes only)."""
  try:
    return kernel_layouts(graphdef, abstract_params)
  except ValueError as e:
    raise ConfigError(f"config 'prune'/'quant': {e}; set prune.method=none and "
                      "quant.qat=none") from None


def setup_line(cfg) -> str:
  """What the run prunes and quantizes, and when, in one line (printed at the start)."""
  p, parts = cfg.prune, []
  if p.method != "none":
    target = {"alpha": f"alpha={p.alpha}", "nm": f"{p.n}:{p.m}",
              "magnitude": f"sparsity {p.sparsity:g} per layer",
              "global": f"sparsity {p.sparsity:g} over all kernels"}[p.method]
    begin, end = prune_window(p, cfg.train.steps)
    when = (f"at step {begin}" if p.schedule == "oneshot" else
            f"cubic from step {begin} to {end}, every {p.update_every}")
    parts.append(f"prune.method={p.method}: {target}, {when}")
  if cfg.quant.qat != "none":
    groups = cfg.quant.group_size or "per output channel"
    parts.append(f"quant.qat={cfg.quant.qat}: fake-quantized kernels (groups {groups})")
  return "; ".join(parts)


def sparsity_line(p, params: dict, layouts: Layouts) -> tuple[str, float]:
  """The end-of-run line on the achieved sparsity of the pruned kernels, and the value."""
  s = total_sparsity(params, layouts)
  what = {"alpha": f"alpha={p.alpha} gave", "nm": f"{p.n}:{p.m} gives",
          "magnitude": f"target {p.sparsity:g},", "global": f"target {p.sparsity:g},"}
  return (f"prune.method={p.method} ({p.schedule}): {what[p.method]} sparsity {s:.4f} "
          f"over the {len(layouts)} pruned kernel(s)"), s
