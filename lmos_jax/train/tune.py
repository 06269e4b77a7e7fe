"""`lmos tune --config C`: the learning rate and batch size, measured on the run itself.

Two measurements replace guesses:

* **Learning rate: a range test** (Smith 2017). `train.schedule=lr_range` raises the LR
  exponentially from `lr * min_lr_ratio` to `lr` over the steps of a short run of the same
  config; the loss per step is smoothed (bias-corrected EMA) and the rule below picks the LR.
  The pick is then checked by two short runs at 0.5x and 2x of it from the same start: a
  neighbour whose final loss is more than 1% lower replaces the pick (the output says so). Warmup: min(2 / (1 - b2), steps / 10) steps, the Adam rule of
  thumb of Ma & Yarats (2021) capped for short runs.
* **Batch size: the simple gradient noise scale** (McCandlish et al. 2018, appendix A).
  For a batch of B rows, E|G_B|^2 = |G|^2 + tr(Sigma) / B. Measuring the squared gradient
  norm at two batch sizes (the microbatches of a batch, and the batch itself) gives unbiased
  estimates of |G|^2 and tr(Sigma); B_simple = tr(Sigma) / |G|^2 estimates the critical
  batch, past which a bigger batch no longer buys proportionally fewer steps. It is measured
  on the params of the 1x check run (a few hundred steps in, as the paper advises: at
  initialisation the noise scale is much smaller than later in training), averaged over
  batches (numerator and denominator separately, as the paper does), and rounded to a
  multiple of the mesh's batch divisor.

Rows count as the batch unit (sequences, sentences), the unit of `train.batch_size`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from lmos_jax.config.plan_file import apply_plan, write_plan
from lmos_jax.errors import ArgumentParser, UserError, number

DIVERGE = 4.0  # the range test stops where the smoothed loss exceeds 4x its minimum so far
BETA = 0.9  # EMA of the range test's losses
MOVE = 0.01  # a check run must beat the pick's final loss by 1% to move the recommendation


@dataclasses.dataclass(frozen=True)
class RangePick:
  """What the range test found: `lr` is the pick (steepest descent before the minimum)."""

  lr: float
  steepest_lr: float
  min_loss_lr: float
  diverged_lr: float | None  # the first LR past the divergence threshold (None: never)


@dataclasses.dataclass(frozen=True)
class NoiseScale:
  """B_simple = trace_sigma / grad_sq, from squared norms at two batch sizes."""

  b_simple: float
  trace_sigma: float
  grad_sq: float


def smooth(losses: Sequence[float], beta: float = BETA) -> np.ndarray:
  """Bias-corrected exponential moving average (Adam's correction): no drag toward 0 early."""
  out, avg = [], 0.0
  for i, x in enumerate(losses, start=1):
    avg = beta * avg + (1 - beta) * float(x)
    out.append(avg / (1 - beta ** i))
  return np.asarray(out)


def lr_range_pick(lrs: Sequence[float], losses: Sequence[float], beta: float = BETA,
                  diverge: float = DIVERGE) -> RangePick:
  """The documented rule: smooth the losses; cut the sweep at divergence (a non-finite loss,
  or a smoothed loss above `diverge` x its running minimum); find the LR of the smoothed
  minimum; the pick is the LR where the smoothed loss falls fastest per unit of log-LR,
  searched at or below that minimum (past it the loss is already turning up)."""
  lrs_N = np.asarray(lrs, np.float64)
  raw_N = np.asarray(losses, np.float64)
  if len(lrs_N) != len(raw_N) or len(lrs_N) < 3:
    raise ValueError("lr_range_pick needs equally many (>= 3) learning rates and losses")
  if np.any(np.diff(lrs_N) <= 0):
    raise ValueError("lr_range_pick: the learning rates must increase")
  finite = np.isfinite(raw_N)
  end = int(np.argmin(finite)) if not finite.all() else len(raw_N)
  s_N = smooth(raw_N[:end], beta)
  run_min = np.minimum.accumulate(s_N)
  over = np.nonzero(s_N > diverge * run_min)[0]
  cut = int(over[0]) if len(over) else end
  diverged = float(lrs_N[cut]) if cut < len(lrs_N) else None
  if cut < 3:
    raise ValueError(f"lr_range_pick: the loss diverged within {cut} steps, at lr "
                     f"{lrs_N[0]:.3g}; start the sweep lower")
  s_N, x_N = s_N[:cut], np.log(lrs_N[:cut])
  i_min = int(np.argmin(s_N))
  slope = np.gradient(s_N, x_N)
  i_steep = int(np.argmin(slope[:i_min + 1]))
  return RangePick(lr=float(lrs_N[i_steep]), steepest_lr=float(lrs_N[i_steep]),
                   min_loss_lr=float(lrs_N[i_min]), diverged_lr=diverged)


def noise_scale(sq_small: float, b_small: float, sq_big: float, b_big: float) -> NoiseScale:
  """Unbiased |G|^2 and tr(Sigma) from mean squared gradient norms at two batch sizes
  (McCandlish et al. 2018, eqs. A.2-A.3), and their ratio B_simple."""
  if not 0 < b_small < b_big:
    raise ValueError(f"noise_scale: need 0 < b_small ({b_small}) < b_big ({b_big})")
  grad_sq = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
  trace = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
  b_simple = trace / grad_sq if grad_sq > 0 else math.inf
  return NoiseScale(b_simple=float(b_simple), trace_sigma=float(trace), grad_sq=float(grad_sq))


def round_batch(b: float, divisor: int, lo: int, hi: int) -> int:
  """The nearest power-of-two multiple of `divisor` to `b` (in log scale), within [lo, hi]."""
  if not math.isfinite(b) or b <= 0:
    return hi if math.isinf(b) else lo
  options = [divisor * 2 ** k for k in range(0, 30) if lo <= divisor * 2 ** k <= hi]
  if not options:
    return max(lo, divisor)
  return min(options, key=lambda o: abs(math.log(o) - math.log(b)))


def warmup_steps(b2: float, steps: int) -> int:
  """Adam's warmup rule of thumb, 2 / (1 - b2) steps, capped at a tenth of the run."""
  return int(min(round(2.0 / (1.0 - b2)), steps // 10))


# ------------------------------------------------------------------ measurements on a run


def _short_run(cfg, workdir: Path, steps: int, **train: Any) -> list[dict]:
  """Trains a copy of `cfg` for `steps` steps in `workdir`, logging every step; its rows."""
  from lmos_jax.train.trainer import train as run_training
  c = cfg.copy_and_resolve_references()
  t = c.train
  t.steps, t.log_every, t.eval_every, t.ckpt_every = steps, 1, steps, steps
  t.steps_per_call = 1  # a metrics row per step
  if "epochs" in t:
    t.epochs = 0.0  # steps, not epochs, size these runs
  t.keep_checkpoints, t.keep_best, t.sample_tokens, t.progress = 1, 0, 0, False
  t.max_bad_steps = steps  # the range test's end may go non-finite: keep sweeping
  for k, v in train.items():
    setattr(t, k, v)
  c.tracking.wandb = False
  # a row per step makes the first rows' throughput NaN (its clock starts after compiling)
  logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
  with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result (--json)
    run_training(c, workdir)
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]
  return [r for r in rows if "loss" in r and "lr" in r]


def range_test(cfg, workdir: Path, lr_min: float, lr_max: float, steps: int
               ) -> tuple[list[float], list[float]]:
  """(lr, loss) per step of an exponential LR sweep from lr_min to lr_max."""
  rows = _short_run(cfg, workdir, steps, schedule="lr_range", lr=lr_max,
                    min_lr_ratio=lr_min / lr_max, warmup_steps=0)
  return [r["lr"] for r in rows], [r["loss"] for r in rows]


def final_loss(rows: list[dict], tail: int = 10) -> float:
  """Mean training loss of the last `tail` logged steps (one step's loss is too noisy)."""
  xs = [r["loss"] for r in rows[-tail:]]
  return float(np.mean(xs)) if xs and all(map(math.isfinite, xs)) else math.inf


class GradNorms(NamedTuple):
  small: float  # mean |G_small|^2 over the microbatches
  big: float  # mean |G_big|^2 over the batches
  batch_divisor: int  # the mesh's data-parallel size (mesh.data * mesh.fsdp, resolved)


def grad_sq_norms(cfg, params_workdir: Path, batches: int, split: int) -> GradNorms:
  """Mean squared gradient norms over `batches` batches of the config's data at the params
  saved in `params_workdir`: G_big is a batch's mean gradient, the G_small are the mean
  gradients of its `split` microbatches."""
  import jax
  import jax.numpy as jnp
  from lmos_jax.train.step import loss_and_grads
  from lmos_jax.train.trainer import build_run, global_batch
  from lmos_jax.workdir import workdir_params

  run = build_run(cfg.copy_and_resolve_references())
  step_cfg = dataclasses.replace(run.step_cfg, microbatches=1)
  from lmos_jax.peft.wrap import overlay_params, split_by
  abstract = run.abstract_state["params"]
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  flat, _ = split_by(workdir_params(params_workdir), lambda _: True)
  params = jax.tree.map(jnp.asarray, overlay_params(zeros, flat, str(params_workdir)))

  @jax.jit
  def sq_norms(p, batch):
    def one(mb):
      loss_sum, weight, _, g = loss_and_grads(step_cfg, p, mb, None)
      return jax.tree.map(lambda x: x / weight, g), weight
    mbs = jax.tree.map(lambda x: x.reshape(split, x.shape[0] // split, *x.shape[1:]), batch)
    g_k, w_k = jax.lax.map(one, mbs)
    sq = lambda t: sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(t))
    small = jnp.mean(jax.vmap(sq)(g_k))
    frac_k = w_k / jnp.sum(w_k)
    big = sq(jax.tree.map(lambda x: jnp.tensordot(frac_k, x, axes=1), g_k))
    return small, big

  small, big = [], []
  start = int(cfg.train.steps)  # batches after the ones the check run trained on
  with jax.set_mesh(run.mesh):
    for i in range(batches):
      b = global_batch(run, run.data.train_batch(start + i))
      s, g = sq_norms(params, b)
      small.append(float(s))
      big.append(float(g))
  divisor = int(run.mesh.shape["data"]) * int(run.mesh.shape["fsdp"])
  return GradNorms(float(np.mean(small)), float(np.mean(big)), divisor)


# ------------------------------------------------------------------------------ command


def parse(argv: list[str]):
  from lmos_jax.config.command_line import config_flag_values, parse_flags
  ap = ArgumentParser(prog=argv[0], description=__doc__.splitlines()[0],
                      epilog="--config=FILE[:arg] and --config.FIELD=VALUE as for lmos train")
  ap.add_argument("--range-steps", type=number(int, 10), default=200,
                  help="steps of the LR range test (default 200)")
  ap.add_argument("--lr-min", type=number(float, 0.0), default=1e-6)
  ap.add_argument("--lr-max", type=number(float, 0.0), default=1.0)
  ap.add_argument("--check-steps", type=number(int, 10), default=200,
                  help="steps of each check run at 0.5x, 1x and 2x the pick (default 200)")
  ap.add_argument("--noise-batches", type=number(int, 1), default=8,
                  help="batches averaged for the gradient noise scale (default 8)")
  ap.add_argument("--split", type=number(int, 2), default=None,
                  help="microbatches per batch for the small-batch gradients (default: the "
                       "largest divisor of train.batch_size up to 8)")
  ap.add_argument("--json", action="store_true", help="print one JSON document on stdout")
  ap.add_argument("--write", default=None, metavar="WORKDIR",
                  help="merge the recommendation into WORKDIR/plan.json, for `lmos train "
                       "--config.plan=WORKDIR/plan.json`")
  ap.add_argument("--keep", default=None,
                  help="keep the short runs' workdirs under this directory (default: a "
                       "temporary one, removed)")
  args, rest = ap.parse_known_args(argv[1:])
  if not args.lr_min < args.lr_max:
    raise UserError(f"--lr-min={args.lr_min} must be below --lr-max={args.lr_max}")
  fv, config_argv = config_flag_values([argv[0], *rest])
  parse_flags(fv, config_argv)
  cfg = fv.config
  for line in apply_plan(cfg):  # tune the planned layout; the short runs must not re-apply it
    print(f"lmos tune: plan sets {line}", file=sys.stderr)
  cfg.plan = ""
  b = cfg.train.batch_size
  if args.split is None:
    args.split = max([k for k in range(2, 9) if b % k == 0], default=b)
  if b % args.split or args.split > b:
    raise UserError(f"--split={args.split} must divide train.batch_size="
                    f"{cfg.train.batch_size}")
  return args, cfg


def tune(cfg, args, root: Path) -> dict:
  """Range test, pick, 0.5x/1x/2x check, noise scale: the measured recommendation."""
  log = (lambda m: print(m, file=sys.stderr, flush=True))
  log(f"lmos tune: LR range test, {args.range_steps} steps, lr {args.lr_min:g} -> "
      f"{args.lr_max:g}")
  lrs, losses = range_test(cfg, root / "range", args.lr_min, args.lr_max, args.range_steps)
  pick = lr_range_pick(lrs, losses)
  log(f"lmos tune: steepest descent at lr {pick.steepest_lr:.3g}, smoothed minimum at "
      f"{pick.min_loss_lr:.3g}, diverged at "
      f"{'-' if pick.diverged_lr is None else f'{pick.diverged_lr:.3g}'}")
  warm = warmup_steps(cfg.train.b2, args.check_steps)
  checks = {}
  for factor in (0.5, 1.0, 2.0):
    lr = pick.lr * factor
    rows = _short_run(cfg, root / f"check_{factor:g}x", args.check_steps, lr=lr,
                      warmup_steps=warm)
    checks[factor] = {"lr": lr, "final_loss": final_loss(rows)}
    log(f"lmos tune: check at {factor:g}x (lr {lr:.3g}): final loss "
        f"{checks[factor]['final_loss']:.4f}")
  best = checked_pick(checks)
  b = cfg.train.batch_size
  norms = grad_sq_norms(cfg, root / "check_1x", args.noise_batches, args.split)
  ns = noise_scale(norms.small, b / args.split, norms.big, b)
  d = norms.batch_divisor
  batch = round_batch(ns.b_simple, d, d, 64 * b)
  return {"lr": checks[best]["lr"], "lr_range_pick": pick.lr, "moved_by_check": best != 1.0,
          "warmup_steps": warm, "batch_size": batch, "noise_scale": ns.b_simple,
          "trace_sigma": ns.trace_sigma, "grad_sq": ns.grad_sq,
          "min_loss_lr": pick.min_loss_lr, "diverged_lr": pick.diverged_lr,
          "checks": [{"factor": f, **v} for f, v in checks.items()]}


def checked_pick(checks: dict[float, dict]) -> float:
  """The factor to recommend: 1x unless a neighbour's final loss is lower by more than
  MOVE (a short run's loss is noisy at the 1% level: a smaller edge is no evidence)."""
  best = min(checks, key=lambda f: checks[f]["final_loss"])
  if checks[best]["final_loss"] < checks[1.0]["final_loss"] * (1 - MOVE):
    return best
  return 1.0


def format_report(r: dict, batch_now: int) -> str:
  lines = ["| check | lr | final loss (mean of last 10 steps) |", "|---|---|---|"]
  lines += [f"| {c['factor']:g}x | {c['lr']:.3g} | {c['final_loss']:.4f} |" for c in r["checks"]]
  lines += ["", f"range test pick {r['lr_range_pick']:.3g} (steepest descent; smoothed "
            f"minimum at {r['min_loss_lr']:.3g})"
            + ("; the check moved it" if r["moved_by_check"] else ""),
            f"gradient noise scale B_simple = {r['noise_scale']:.1f} rows (config batch "
            f"{batch_now})",
            "overrides: " + " ".join(f"--config.train.{k}={r[k]:.6g}" if k == "lr" else
                                     f"--config.train.{k}={r[k]}"
                                     for k in ("lr", "warmup_steps", "batch_size"))]
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  args, cfg = parse(argv)
  import shutil
  root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lmos-tune-"))
  if args.keep and root.exists() and any(root.iterdir()):
    raise UserError(f"--keep {root}: the directory is not empty; give a new one")
  try:
    result = tune(cfg, args, root)
  except ValueError as e:  # the range test found nothing to pick from
    print(f"lmos tune: {e}", file=sys.stderr)
    return 1
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  if args.json:
    print(json.dumps(result))
  else:
    print(format_report(result, cfg.train.batch_size))
  if args.write:
    keys = ("lr", "warmup_steps", "batch_size")
    path = write_plan(args.write, {f"train.{k}": result[k] for k in keys}, "lmos tune")
    print(f"wrote {path}", file=sys.stderr)
  return 0
