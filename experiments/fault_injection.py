"""Fault-injection campaign against `lmos train`: kill, preempt, corrupt, poison; then resume.

Every injection runs a real `lmos train` subprocess of a tiny config, injects one fault,
reruns the same command, and compares the finished run's metrics.jsonl with an
uninterrupted reference run (bitwise, timing columns aside). Scenarios:

  kill9_step   SIGKILL at a random logged step
  kill9_save   SIGKILL while an async save is being written (a *.orbax-checkpoint-tmp* dir
               exists); `save_hit` counts how often the kill landed inside the save window
  sigterm      SIGTERM at a random step: must save, wait, exit 0, then resume exactly
  corrupt      SIGKILL, then truncate or bit-flip the newest checkpoint's chunk files: the
               restart must name it, move it aside and resume from the previous good one
  nan          NaN loss weights on one batch (skip policy), SIGKILL later, resume: compared
               with an uninterrupted run with the same NaN batch

data_lost counts injections where the restart resumed from an older step than the newest
complete (and uncorrupted) checkpoint on disk at the time of the fault, or did not finish.

  python experiments/fault_injection.py --rounds 2       # 5 scenarios x 2 = 10 injections
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = 10
EXACT = ("loss", "grad_norm", "accuracy", "lr", "tokens", "nonfinite", "skipped_steps",
         "eval_loss", "eval_accuracy")
NAN_BATCH = 4  # batch index poisoned in the nan scenario (consumed by step 5)
CONFIG = f'''
from lmos_jax.config.schema import base_config


def get_config(arg=None):
  c = base_config()
  c.model.num_layers, c.model.num_heads, c.model.d_model, c.model.max_seq_len = 2, 4, 64, 32
  c.data.seq_len, c.data.max_chars = 32, 50000
  c.train.batch_size, c.train.steps, c.train.warmup_steps = 16, {STEPS}, 2
  c.train.log_every, c.train.eval_every, c.train.ckpt_every = 1, 4, 2
  c.train.keep_checkpoints = 3
  c.train.eval_batches, c.train.sample_tokens, c.train.progress = 1, 0, False
  return c
'''


# ---------------------------------------------------------------- child mode (NaN batches)


def child_main(argv: list[str]) -> int:
  """`lmos train` with batch NAN_BATCH's loss weights set to NaN (a poisoned batch)."""
  import numpy as np

  from lmos_jax.train import trainer

  real = trainer.build_data

  class NanBatches:
    def __init__(self, data):
      self._data = data

    def __getattr__(self, name):
      return getattr(self._data, name)

    @staticmethod
    def _weighted(batch, scale):
      batch = dict(batch)
      w = batch.get("weights", np.ones(batch["targets"].shape, np.float32))
      batch["weights"] = (w * scale).astype(np.float32)
      return batch

    def train_batch(self, step):
      return self._weighted(self._data.train_batch(step), np.nan if step == NAN_BATCH else 1.0)

    def val_batches(self):
      return [self._weighted(b, 1.0) for b in self._data.val_batches()]

  trainer.build_data = lambda *a, **k: NanBatches(real(*a, **k))
  return trainer.main(["lmos train", *argv])


# ---------------------------------------------------------------- driver


def rows_of(workdir: Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
  return [{"step": r["step"], **{k: r[k] for k in EXACT if k in r}} for r in rows]


def last_step(workdir: Path) -> int:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return 0
  return max((json.loads(l)["step"] for l in path.read_text().splitlines()
              if l.endswith("}")), default=0)


def complete_steps(workdir: Path) -> list[int]:
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


class Campaign:
  def __init__(self, root: Path, seed: int):
    self.root, self.rng = root, random.Random(seed)
    self.config = root / "fi_config.py"
    self.config.write_text(CONFIG)
    self.env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
                    XLA_FLAGS="--xla_force_host_platform_device_count=8",
                    JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    self.count = 0

  def start(self, workdir: Path, nan: bool = False) -> subprocess.Popen:
    head = [__file__, "--child-nan"] if nan else ["-m", "lmos_jax.cli", "train"]
    return subprocess.Popen([sys.executable, *head, "--config", str(self.config),
                             "--workdir", str(workdir)], cwd=REPO, env=self.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  def finish(self, workdir: Path, nan: bool = False) -> tuple[int, str]:
    proc = self.start(workdir, nan)
    out, _ = proc.communicate()
    return proc.returncode, out

  def new_dir(self, name: str) -> Path:
    self.count += 1
    d = self.root / f"{self.count:03d}_{name}"
    d.mkdir()
    return d

  def wait_until(self, proc: subprocess.Popen, cond, timeout: float = 900) -> bool:
    t0 = time.time()
    while not cond():
      if proc.poll() is not None or time.time() - t0 > timeout:
        return False
      time.sleep(0.002)
    return True


def resumed_from(out: str) -> int:
  m = re.search(r"resuming at step (\d+)", out)
  return int(m.group(1)) if m else 0


def corrupt_newest(workdir: Path, rng: random.Random) -> tuple[int | None, str]:
  steps = complete_steps(workdir)
  if not steps:
    return None, "none"
  step_dir = workdir / "checkpoints" / str(steps[-1])
  files = [p for p in (step_dir / "state").rglob("d/*") if p.is_file() and p.stat().st_size > 1024]
  how = rng.choice(["truncate", "bitflip"])
  for f in files:
    raw = bytearray(f.read_bytes())
    if how == "truncate":
      raw = raw[: len(raw) // 2]
    else:
      raw[rng.randrange(len(raw))] ^= 0xFF
    f.write_bytes(bytes(raw))
  return steps[-1], how


def run_one(c: Campaign, kind: str, refs: dict) -> dict:
  nan = kind == "nan"
  wd = c.new_dir(kind)
  proc = c.start(wd, nan)
  note, fault_ok, expect_fallback = "", True, None
  if kind in ("kill9_step", "corrupt", "nan"):
    lo = NAN_BATCH + 2 if nan else 3
    k = c.rng.randint(lo, STEPS - 1)
    enough = (lambda: len(complete_steps(wd)) >= 2) if kind == "corrupt" else lambda: True
    fault_ok = c.wait_until(proc, lambda: last_step(wd) >= k and enough())
    proc.send_signal(signal.SIGKILL)
    note = f"kill@{last_step(wd)}"
  elif kind == "kill9_save":
    k = c.rng.choice([2, 4, 6, 8])  # the step whose save we try to interrupt
    tmp_seen = lambda: any(".orbax-checkpoint-tmp" in p.name  # noqa: E731
                           for p in (wd / "checkpoints").glob(f"{k}.*"))
    fault_ok = c.wait_until(proc, lambda: tmp_seen() or last_step(wd) > k + 1)
    hit = tmp_seen()
    proc.send_signal(signal.SIGKILL)
    note = f"kill@{last_step(wd)} {'inside save ' + str(k) if hit else 'missed save window'}"
  elif kind == "sigterm":
    k = c.rng.randint(2, STEPS - 1)
    fault_ok = c.wait_until(proc, lambda: last_step(wd) >= k)
    proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate()
  if kind == "sigterm":
    m = re.search(r"stopped by SIGTERM at step (\d+)", out)
    fault_ok = fault_ok and proc.returncode == 0 and m is not None
    note = f"term@{m.group(1) if m else '?'} rc={proc.returncode}"
  if proc.returncode == 0 and kind != "sigterm":
    fault_ok = False  # finished before the fault landed
  # the newest complete step at fault time is what a restart must resume from
  expected = complete_steps(wd)
  if kind == "corrupt":
    bad, how = corrupt_newest(wd, c.rng)
    expect_fallback = bad
    expected = [s for s in expected if s != bad]
    note += f" {how} step {bad}"
  rc, out2 = c.finish(wd, nan)
  start = resumed_from(out2)
  lost = rc != 0 or start < (expected[-1] if expected else 0)
  if expect_fallback is not None:
    lost = lost or f"checkpoints/{expect_fallback}" not in out2
  exact = rc == 0 and rows_of(wd) == refs["nan" if nan else "plain"]
  return {"kind": kind, "fault_ok": fault_ok, "exact": exact, "lost": lost,
          "note": f"{note}; resumed@{start}", "dir": str(wd)}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=2, help="injections per scenario")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--root", default="", help="scratch dir (default: a temp dir, removed)")
  p.add_argument("--kinds", default="kill9_step,kill9_save,sigterm,corrupt,nan")
  args = p.parse_args(argv)
  root = Path(args.root or tempfile.mkdtemp(prefix="lmos_fi_"))
  root.mkdir(parents=True, exist_ok=True)
  c = Campaign(root, args.seed)
  t0 = time.time()
  kinds = args.kinds.split(",")
  refs = {}
  for name, nan in (("plain", False), ("nan", True)):
    if name == "nan" and "nan" not in kinds:
      continue
    wd = c.new_dir("reference_" + name)
    rc, out = c.finish(wd, nan)
    if rc != 0:
      print(out[-3000:])
      raise SystemExit(f"reference run {name} failed (rc {rc})")
    refs[name] = rows_of(wd)
  nan_rows = [r["step"] for r in refs.get("nan", []) if r["nonfinite"]]
  print(f"references done in {time.time() - t0:.0f} s; nan reference flags steps {nan_rows}",
        flush=True)
  results = []
  for r in range(args.rounds):
    for kind in kinds:
      res = run_one(c, kind, refs)
      results.append(res)
      print(f"  {kind:<11} exact={res['exact']!s:<5} lost={res['lost']!s:<5} "
            f"fault_landed={res['fault_ok']!s:<5} {res['note']}", flush=True)
  print(f"\n{'scenario':<12}{'injections':>11}{'resumed_exactly':>17}{'data_lost':>11}"
        f"{'fault_landed':>14}")
  for kind in kinds:
    rs = [r for r in results if r["kind"] == kind]
    print(f"{kind:<12}{len(rs):>11}{sum(r['exact'] for r in rs):>17}"
          f"{sum(r['lost'] for r in rs):>11}{sum(r['fault_ok'] for r in rs):>14}")
  n = len(results)
  print(f"(wall {time.time() - t0:.0f} s, {STEPS}-step runs, scratch {root})")
  print(f"injections={n} resumed_exactly={sum(r['exact'] for r in results)} "
        f"data_lost={sum(r['lost'] for r in results)}")
  if not args.root:
    shutil.rmtree(root, ignore_errors=True)
  return 0


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--child-nan":
    sys.exit(child_main(sys.argv[2:]))
  sys.exit(main())
