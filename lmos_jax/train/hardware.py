"""`lmos plan --compare`: which hardware to train a config on.

Each candidate target (a chip of the spec-sheet table in `lmos_jax.train.metrics` at a
device count) is planned as `lmos plan --target` plans it, and keeps its fastest layout that
fits. The targets are then compared on the step time (what a deadline cares about) and on
the device-seconds per million tokens (step time x devices / tokens per step: what more
devices spend on collectives and smaller per-device matmuls); with `--prices` (per
device-hour, e.g. h100=2.5,tpu-v5e=1.2) on the cost per million tokens, which picks the
cheapest. A target where nothing fits says how much memory per device its closest layout
needs.

The estimates are the analytic ones of a described target (spec-sheet peaks, an assumed
matmul efficiency, spec link bandwidths): they rank chips and device counts for the model's
size, they are not measured step times; `lmos plan --measure` on the chosen hardware is.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from lmos_jax.train.metrics import CHIPS
from lmos_jax.train.plan import (GiB, MEMORY_HEADROOM, Estimate, NothingFits, PlanError,
                                 PlanFlagError, Target, make_plan, parse_target, target_name)

# `--compare all`: every chip with a known link bandwidth, alone and eight together
ALL_COUNTS = (1, 8)


@dataclasses.dataclass(frozen=True)
class TargetChoice:
  """One target's outcome: its fastest fitting layout, or why there is none."""

  target: Target
  tokens_per_step: int
  best: Estimate | None  # None: nothing fits (or no layout divides the batch)
  needs_bytes: float | None = None  # nothing fits: the closest layout's bytes per device
  reason: str = ""  # no layout at all: why
  price_per_hour: float | None = None  # --prices: one device-hour of this chip

  @property
  def name(self) -> str:
    return target_name(self.target.chip, self.target.num_devices)

  @property
  def device_s_per_mtok(self) -> float | None:
    """Device-seconds per million tokens of the best layout (None when nothing fits)."""
    if self.best is None:
      return None
    return self.best.step_s * self.target.num_devices / self.tokens_per_step * 1e6

  @property
  def cost_per_mtok(self) -> float | None:
    """Price of a million tokens at the chip's device-hour price (None: no price or no fit)."""
    s = self.device_s_per_mtok
    return None if s is None or self.price_per_hour is None else s / 3600 * self.price_per_hour


def parse_targets(spec: str) -> list[Target]:
  """'h100x1,h100x8,tpu-v5e-8' (or 'all') -> described Targets, in the order given."""
  if spec.strip().lower() == "all":
    chips = [c for c in CHIPS.values() if c.link_bw is not None]
    return [Target(c, n, described=True) for c in chips for n in ALL_COUNTS]
  names = [s for s in (part.strip() for part in spec.split(",")) if s]
  if not names:
    raise PlanFlagError("--compare: give targets such as h100x1,h100x8,tpu-v5e-8, or all")
  return [parse_target(s) for s in names]


def parse_prices(spec: str | None) -> dict[str, float]:
  """'h100=2.5,tpu-v5e=1.2' -> {chip: price of one device-hour}; any currency, one for all."""
  prices: dict[str, float] = {}
  for part in filter(None, (s.strip() for s in (spec or "").split(","))):
    chip, _, value = part.partition("=")
    try:
      price = float(value)
    except ValueError:
      price = -1.0
    if chip.strip().lower() not in CHIPS or not price > 0:
      raise PlanFlagError(f"--prices {part!r}: expected CHIP=PRICE per device-hour with CHIP "
                          f"one of {', '.join(CHIPS)} and PRICE > 0, e.g. h100=2.5")
    prices[chip.strip().lower()] = price
  return prices


def choose_target(cfg, target: Target, remats: Sequence[str],
                  max_microbatches: int) -> TargetChoice:
  """The fastest layout of `cfg` that fits on `target` (the plan's first choice)."""
  tokens = cfg.train.batch_size * cfg.data.seq_len
  try:
    plan = make_plan(cfg, target, remats=remats, max_microbatches=max_microbatches)
  except NothingFits as e:
    return TargetChoice(target, tokens, None, needs_bytes=e.smallest.memory)
  except PlanFlagError:
    raise
  except PlanError as e:  # no mesh of this many devices divides the batch
    return TargetChoice(target, tokens, None, reason=str(e))
  return TargetChoice(target, tokens, plan.best)


def compare_targets(cfg, targets: Sequence[Target], remats: Sequence[str],
                    max_microbatches: int, prices: dict[str, float] | None = None
                    ) -> list[TargetChoice]:
  """Every target's choice: those that fit by step time, then the rest by memory needed."""
  prices = prices or {}
  choices = [dataclasses.replace(choose_target(cfg, t, remats, max_microbatches),
                                price_per_hour=prices.get(t.chip.name)) for t in targets]
  fit = sorted((c for c in choices if c.best), key=lambda c: (c.best.step_s, c.name))
  rest = [c for c in choices if not c.best]
  return fit + sorted(rest, key=lambda c: (c.needs_bytes is None, c.needs_bytes or 0.0))


def cheapest(choices: Sequence[TargetChoice]) -> TargetChoice | None:
  """The fitting target with the lowest cost per token among the priced ones, or (no prices)
  with the fewest device-seconds per token; None when nothing fits."""
  fit = [c for c in choices if c.best]
  priced = [c for c in fit if c.cost_per_mtok is not None]
  if priced:
    return min(priced, key=lambda c: (c.cost_per_mtok, c.best.step_s))
  return min(fit, key=lambda c: (c.device_s_per_mtok, c.best.step_s)) if fit else None


def format_comparison(choices: Sequence[TargetChoice], cfg) -> str:
  """The table `lmos plan --compare` prints, then the picks."""
  tokens = cfg.train.batch_size * cfg.data.seq_len
  priced = any(c.price_per_hour is not None for c in choices)
  cost_head = " cost per 1M tokens |" if priced else ""
  rows = [f"hardware for batch {cfg.train.batch_size} x {cfg.data.seq_len} ({tokens:,} tokens "
          f"per step); analytic estimates at spec-sheet rates, {100 * MEMORY_HEADROOM:.0f}% of "
          "each device's memory usable",
          "| target | fits | best layout | est step ms | est tokens/s | device-s per 1M tokens "
          f"|{cost_head} est GiB/device | GiB/device |", "|" + "---|" * (9 if priced else 8)]
  for c in choices:
    mem = c.target.chip.memory / GiB
    cost = ""
    if priced:
      cost = " - |" if c.cost_per_mtok is None else f" {c.cost_per_mtok:.4g} |"
    if c.best is None:
      need = "-" if c.needs_bytes is None else f"{c.needs_bytes / GiB:.2f}"
      why = "no" if not c.reason else "no layout"
      rows.append(f"| {c.name} | {why} | - | - | - | - |{cost} {need} | {mem:.0f} |")
      continue
    l = c.best.layout
    lay = (f"data={l.data} fsdp={l.fsdp} tensor={l.tensor} micro={l.microbatches} "
           f"remat={l.remat}")
    rows.append(f"| {c.name} | yes | {lay} | {1e3 * c.best.step_s:.2f} | "
                f"{tokens / c.best.step_s:,.0f} | {c.device_s_per_mtok:.3f} |{cost} "
                f"{c.best.memory / GiB:.2f} | {mem:.0f} |")
  fit = [c for c in choices if c.best]
  if not fit:
    rows.append("\nnothing fits on any target: more devices, a smaller batch or model, or "
                "remat (see `lmos plan --target T` for one target's options)")
    return "\n".join(rows)
  low = cheapest(choices)
  rows.append(f"\nfastest: {fit[0].name} ({1e3 * fit[0].best.step_s:.2f} ms per step)")
  if low.cost_per_mtok is not None:
    rows.append(f"cheapest per token: {low.name} ({low.cost_per_mtok:.4g} per 1M tokens at "
                f"{low.price_per_hour:g} per device-hour)")
  else:
    rows.append(f"fewest device-seconds per token: {low.name} ({low.device_s_per_mtok:.3f} "
                "device-s per 1M tokens; --prices CHIP=PRICE,... to compare cost)")
  return "\n".join(rows)


def comparison_json(choices: Sequence[TargetChoice]) -> list[dict]:
  """`lmos plan --compare --json`: one object per target, in the table's order."""
  low = cheapest(choices)
  return [{"target": c.name, "chip": c.target.chip.name, "devices": c.target.num_devices,
           "fits": c.best is not None,
           "overrides": c.best.layout.overrides() if c.best else None,
           "predicted_step_s": c.best.step_s if c.best else None,
           "predicted_peak_bytes": c.best.memory if c.best else c.needs_bytes,
           "device_seconds_per_million_tokens": c.device_s_per_mtok,
           "price_per_device_hour": c.price_per_hour, "cost_per_million_tokens": c.cost_per_mtok,
           "memory_bytes": c.target.chip.memory,
           "fastest": c is choices[0] and c.best is not None, "cheapest": c is low}
          for c in choices]
