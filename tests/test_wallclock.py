"""A run's wall time split into parts (lmos_jax.train.wallclock): the parts add up to the wall
time measured around `train()`, and each part gets the time of what it names."""

import json
import time

import pytest

from helpers import tiny_config
from lmos_jax.train.wallclock import PARTS, WallClock, describe


def _timed_sleep(seconds: float) -> float:
  """Sleeps; returns the seconds it really took (more than asked on a loaded machine)."""
  t0 = time.perf_counter()
  time.sleep(seconds)
  return time.perf_counter() - t0


def test_parts_partition_the_time_with_nothing_counted_twice():
  clock = WallClock()
  startup = _timed_sleep(0.05)
  clock.switch("steps")
  with clock.measure("eval"):
    evals = _timed_sleep(0.1)
    with clock.measure("checkpoint"):
      ckpt = _timed_sleep(0.1)
  steps = _timed_sleep(0.05)
  parts = clock.breakdown()
  # each part is its own sleeps plus a few clock reads; the margin (50 ms, for a scheduler
  # delay on a loaded machine) is below the 100 ms nested block, which must not be counted twice
  for part, slept in (("startup", startup), ("eval", evals), ("checkpoint", ckpt),
                      ("steps", steps)):
    assert slept <= parts[part] < slept + 0.05, (part, parts[part], slept)
  assert parts["wall"] == pytest.approx(sum(parts[p] for p in PARTS))
  assert parts["wall"] == pytest.approx(clock.elapsed(), abs=0.05)  # two clock reads apart
  assert describe(parts).startswith(f"wall {parts['wall']:.1f} s = start-up ")


def test_train_breakdown_sums_to_the_measured_wall(tmp_path, capsys):
  from lmos_jax.train.trainer import train
  c = tiny_config(steps=6, log_every=2, eval_every=2, ckpt_every=3)
  c.train.sample_tokens = 4
  t0 = time.perf_counter()
  train(c, tmp_path)
  wall = time.perf_counter() - t0
  rows = [json.loads(x) for x in (tmp_path / "wall_time.jsonl").read_text().splitlines()]
  assert len(rows) == 1 and rows[0]["step"] == 6
  parts = rows[0]
  # nothing counted twice: the clock never reads more than the wall around the call; nothing
  # lost: what lies outside it is train()'s call and return (freeing the run's arrays, which a
  # loaded 2-core machine can stretch to a few tenths of a second), far below any part's size
  assert parts["wall"] <= wall
  assert wall - parts["wall"] < 0.1 * wall + 0.3, (wall, parts)
  assert parts["wall"] == pytest.approx(sum(parts[p] for p in PARTS), abs=1e-3)  # 4-digit rows
  for p in PARTS:  # 3 evals, 2 checkpoints (+ the close wait), a sample: each part took time
    assert parts[p] > 0, p
  assert parts["first_step"] > parts["steps"] / 5  # the first call compiles; 5 more do not
  out = capsys.readouterr().out
  assert "lmos train: first step done" in out and "lmos train: wall " in out


def test_process_age_counts_time_before_the_clock():
  """A fresh interpreter that sleeps 0.5 s after start reports an age of at least that much
  (ticks are 10 ms), and a clock made with it has that much start-up already."""
  import subprocess
  import sys
  code = ("import time; time.sleep(0.5)\n"
          "from lmos_jax.train.wallclock import WallClock, process_age\n"
          "age = process_age(); c = WallClock(already=age)\n"
          "print(age, c.breakdown()['startup'])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  age, startup = map(float, out.stdout.split())
  if age == 0.0:
    pytest.skip("no /proc here: the age is unknown")
  assert 0.49 <= age < 30.0
  assert startup >= age
