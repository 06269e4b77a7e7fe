"""Does `lmos plan` predict what it measures, and does `lmos tune` pick a learning rate a grid
of real runs agrees with?

Layouts: for each config, `lmos plan --config C --measure --json --recalibrate` (a fresh
process, so the host is split into CPU devices as `lmos train` would split it) compiles the
best candidates, predicts their step time from a calibration probed just before, runs the
candidates in turns for a few steps each (after an untimed warm-up round) with the
planner's two reference steps and a pass of its price probes taking turns in the same
rounds, and reports both. Printed per candidate: the prediction from the calibration, the
prediction again from the prices probed and the reference steps' speed of the measuring
rounds (a shared machine's speed moves between the two), the measured ms,
its ratio to the second and whether that is within the 20% target, its ratio to the first;
predicted and measured peak MiB per device, their ratio, whether it is within the 15% target
(on XLA:CPU, which keeps no allocator statistics, the plan reads the peak from the process's
malloc; '-' where it cannot); per config, how the first choice compares with the measured
fastest, and the reference steps' factor and wait in the measuring rounds (`lmos plan`'s
`est alongside:` line).

Learning rate (--tune): `lmos tune --config C --json` picks an LR; then `lmos train` runs at
0.25x, 0.5x, 1x, 2x and 4x the pick for the same steps (the same tokens), and the table says
which reached the lowest final loss (mean of the last logged train losses), whether that best
LR is within 2x of the pick, and how far the pick's loss is from the best (target: 2%).

Run (2 CPU cores; nothing else running, or the measured times are the load's):
  python3 experiments/validate_plan.py                      # three configs, layouts only
  python3 experiments/validate_plan.py --configs configs/shakespeare_char.py:cpu --tune
  python3 experiments/validate_plan.py --precision fp32     # float32 matmuls whatever the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_CONFIGS = ("configs/shakespeare_char.py:cpu", "configs/shakespeare_char.py:baby",
                   "configs/bert_sst2.py")
TARGET_RATIO = 0.2  # the target: predicted within 20% of measured
MEMORY_RATIO = 0.15  # the target: predicted peak memory within 15% of measured
GRID = (0.25, 0.5, 1.0, 2.0, 4.0)  # LR factors of the pick: a 5-point grid, 2x apart
LOSS_TARGET = 0.02  # the target: the pick's loss within 2% of the grid's best


def run_lmos(*args: str, timeout: float) -> subprocess.CompletedProcess:
  """`lmos ARGS` run in a fresh interpreter; a failure prints its stderr and stops."""
  cmd = [sys.executable, "-m", "lmos_jax.cli", *args]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  if res.returncode != 0:
    sys.exit(f"validate_plan: {' '.join(args)} exited {res.returncode}:\n{res.stderr[-3000:]}")
  return res


def lmos(*args: str, timeout: float) -> str:
  """stdout of `lmos ARGS` (`run_lmos`)."""
  return run_lmos(*args, timeout=timeout).stdout


def layout_name(o: dict) -> str:
  return (f"d{o['mesh.data']} f{o['mesh.fsdp']} t{o['mesh.tensor']} "
          f"mb{o['train.microbatches']} {o['model.remat']}")


def validate_layouts(config: str, args) -> list[str]:
  res = run_lmos("plan", f"--config={config}", "--measure", "--json", "--recalibrate",
                 f"--steps={args.steps}", f"--config.train.precision={args.precision}",
                 f"--compile-top={args.compile_top}", f"--remat={args.remat}",
                 f"--max-microbatches={args.max_microbatches}", timeout=args.timeout)
  rows = [r for r in json.loads(res.stdout) if r["measured_step_s"] is not None]
  lines = []
  fastest = min(rows, key=lambda r: r["measured_step_s"])
  for r in rows:
    p, m = r["predicted_step_s"], r["measured_step_s"]
    a = r["predicted_alongside_step_s"]
    lines.append(f"| {config} | {layout_name(r['overrides'])} | {1e3 * p:.1f} | {1e3 * a:.1f} | "
                 f"{1e3 * m:.1f} | {m / a:.2f} | "
                 f"{'yes' if abs(m / a - 1) <= TARGET_RATIO else 'no'} | {m / p:.2f} | "
                 f"{memory_cells(r['predicted_peak_bytes'], r['measured_peak_bytes'])} | "
                 f"{'chosen' if r['chosen'] else ''}{' fastest' if r is fastest else ''} |")
  chosen = next(r for r in rows if r["chosen"])
  ratio = chosen["measured_step_s"] / fastest["measured_step_s"]
  lines.append(f"| {config} | first choice / measured fastest | | | | {ratio:.2f} | "
               f"{'yes' if ratio <= 1.05 else 'no'} (<= 1.05) | | | | | | |")
  lines += [f"| {config} | {line} | | | | | | | | | | | |"
            for line in res.stderr.splitlines() if line.startswith("est alongside:")]
  return lines


def memory_cells(predicted: float, measured: float | None) -> str:
  """'predicted MiB | measured MiB | measured / predicted | within 15%' table cells."""
  if measured is None:
    return f"{predicted / 2**20:.1f} | - | - | -"
  ratio = measured / predicted
  return (f"{predicted / 2**20:.1f} | {measured / 2**20:.1f} | {ratio:.3f} | "
          f"{'yes' if abs(ratio - 1) <= MEMORY_RATIO else 'no'}")


def final_loss(workdir: Path, tail: int) -> float:
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]
  losses = [r["loss"] for r in rows if "loss" in r and "lr" in r]
  return sum(losses[-tail:]) / len(losses[-tail:])


def validate_lr(config: str, args) -> list[str]:
  tuned = json.loads(lmos("tune", f"--config={config}", "--json",
                          f"--config.train.precision={args.precision}",
                          f"--range-steps={args.range_steps}", f"--check-steps={args.grid_steps}",
                          f"--noise-batches={args.noise_batches}", timeout=args.timeout))
  losses = {}
  with tempfile.TemporaryDirectory(prefix="lmos-validate-") as root:
    for f in GRID:
      w = Path(root) / f"lr{f:g}"
      lmos("train", f"--config={config}", f"--workdir={w}", f"--config.train.lr={f * tuned['lr']}",
           f"--config.train.steps={args.grid_steps}", "--config.train.log_every=5",
           f"--config.train.precision={args.precision}",
           f"--config.train.eval_every={args.grid_steps}",
           f"--config.train.ckpt_every={args.grid_steps}", "--config.train.sample_tokens=0",
           timeout=args.timeout)
      losses[f] = final_loss(w, 10)
  best = min(losses, key=losses.get)
  lines = [f"| {config} | {f:g}x | {f * tuned['lr']:.3g} | {losses[f]:.4f} |"
           f"{' best' if f == best else ''} |" for f in GRID]
  lines.append(f"| {config} | tuned: lr {tuned['lr']:.3g}, warmup {tuned['warmup_steps']}, "
               f"batch {tuned['batch_size']} (B_simple {tuned['noise_scale']:.1f}) | | pick's "
               f"loss / best {losses[1.0] / losses[best]:.4f} "
               f"({'yes' if losses[1.0] <= (1 + LOSS_TARGET) * losses[best] else 'no'}) | "
               f"best within 2x of the pick: {'yes' if 0.5 <= best <= 2.0 else 'no'} |")
  return lines


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
  ap.add_argument("--steps", type=int, default=3,
                  help="timed steps per round (5 rounds after a warm-up round)")
  ap.add_argument("--compile-top", type=int, default=6,
                  help="layouts of the analytic ranking compiled and measured (6: as `lmos plan`)")
  ap.add_argument("--remat", default="none,dots_no_batch,full")
  ap.add_argument("--max-microbatches", type=int, default=4)
  ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16_matmul"),
                  help="train.precision of every plan, tune and train run (auto: as lmos "
                       "train picks it)")
  ap.add_argument("--tune", action="store_true", help="also validate `lmos tune`'s LR")
  ap.add_argument("--range-steps", type=int, default=60)
  ap.add_argument("--grid-steps", type=int, default=200)
  ap.add_argument("--noise-batches", type=int, default=2)
  ap.add_argument("--timeout", type=float, default=3600)
  args = ap.parse_args()
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  print("| config | layout | predicted ms | predicted ms, probed alongside | measured ms | "
        "measured / predicted alongside | within 20% | measured / predicted | "
        "predicted MiB/device | measured peak MiB | measured / predicted | within 15% | |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
  for config in args.configs:
    for line in validate_layouts(config, args):
      print(line, flush=True)
  if args.tune:
    print("\n| config | LR factor | lr | final loss | |\n|---|---|---|---|---|", flush=True)
    for config in args.configs:
      for line in validate_lr(config, args):
        print(line, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
