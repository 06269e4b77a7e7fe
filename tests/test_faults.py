"""Fault injection through the real trainer: kill -9, SIGTERM, NaN batches.

Each scenario is compared with one uninterrupted reference run of the same tiny config:
after a restart every logged metric (timing columns aside) must be bitwise identical.
The killed/terminated runs are real `lmos train` subprocesses; resumes run in-process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lmos_jax.config.loading import load_config_file
from lmos_jax.train import trainer
from lmos_jax.train.checkpoint import Checkpointer, NonFiniteError

REPO = Path(__file__).resolve().parents[1]
# Deterministic columns; timing ones (tokens_per_sec, mfu, data_wait_frac...) differ run to run.
EXACT = ("loss", "grad_norm", "accuracy", "lr", "tokens", "nonfinite", "skipped_steps",
         "eval_loss", "eval_accuracy")
# steps of the run: the kill is sent once step 4-7 is logged, so eight or more steps (and
# four or more checkpoint saves) stay between it and the run's end (with 8 steps a run once
# finished between the poll that saw step 7 and the kill)
STEPS = 16
CONFIG = f'''
from lmos_jax.config.schema import base_config


def get_config(arg=None):
  c = base_config()
  c.model.num_layers, c.model.num_heads, c.model.d_model, c.model.max_seq_len = 1, 2, 32, 16
  c.data.seq_len, c.data.max_chars = 16, 20000
  c.train.batch_size, c.train.steps, c.train.warmup_steps = 8, {STEPS}, 2
  c.train.log_every, c.train.eval_every, c.train.ckpt_every = 1, 4, 2
  c.train.eval_batches, c.train.sample_tokens, c.train.progress = 1, 0, False
  return c
'''


def metric_rows(workdir: Path) -> list[dict]:
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l]
  assert all("loss" in r and "nonfinite" in r for r in rows)
  return [{"step": r["step"], **{k: r[k] for k in EXACT if k in r}} for r in rows]


def last_logged_step(workdir: Path) -> int:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return 0
  steps = [json.loads(l)["step"] for l in path.read_text().splitlines() if l.endswith("}")]
  return max(steps, default=0)


def start_train(config: Path, workdir: Path) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
  return subprocess.Popen([sys.executable, "-m", "lmos_jax.cli", "train", "--config",
                           str(config), "--workdir", str(workdir)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(proc: subprocess.Popen, workdir: Path, step: int, timeout: float = 600):
  t0 = time.time()
  while last_logged_step(workdir) < step:
    if proc.poll() is not None:
      pytest.fail(f"train exited early (rc {proc.returncode}):\n{proc.stdout.read()[-3000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      pytest.fail(f"no step {step} logged within {timeout} s")
    time.sleep(0.005)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp("cfg") / "tiny_faults.py"
  path.write_text(CONFIG)
  return path


@pytest.fixture(scope="module")
def reference(config_path, tmp_path_factory) -> list[dict]:
  workdir = tmp_path_factory.mktemp("reference")
  trainer.train(load_config_file(str(config_path)), workdir)
  rows = metric_rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  return rows


def test_kill9_at_random_step_resumes_bitwise(config_path, reference, tmp_path):
  kill_at = random.Random(os.getpid()).randint(4, 7)
  proc = start_train(config_path, tmp_path)
  wait_for_step(proc, tmp_path, kill_at)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = last_logged_step(tmp_path)
  saved = Checkpointer(tmp_path, read_only=True).all_steps()
  assert killed_at < STEPS, "the run finished before the kill; nothing was tested"
  trainer.train(load_config_file(str(config_path)), tmp_path)  # same command again
  assert metric_rows(tmp_path) == reference, (kill_at, killed_at, saved)


def test_sigterm_saves_waits_and_exits_0_then_resumes_bitwise(config_path, reference,
                                                               tmp_path):
  proc = start_train(config_path, tmp_path)
  wait_for_step(proc, tmp_path, 3)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  line = next(l for l in out.splitlines() if "stopped by SIGTERM at step" in l)
  step = int(line.split("at step ")[1].split(";")[0])
  assert 3 <= step < STEPS
  ckpt = Checkpointer(tmp_path, read_only=True)
  assert ckpt.latest_step() == step  # saved at the step it stopped, and complete
  assert "--- sample ---" not in out  # stopped: no end-of-run sample
  trainer.train(load_config_file(str(config_path)), tmp_path)
  assert metric_rows(tmp_path) == reference


class NanBatches:
  """The run's data with NaN loss weights at chosen steps (a poisoned batch)."""

  def __init__(self, data, bad_steps: set[int]):
    self._data, self.bad_steps = data, bad_steps

  def __getattr__(self, name):
    return getattr(self._data, name)

  @staticmethod
  def _weighted(batch: dict, scale: float) -> dict:
    batch = dict(batch)
    weights = batch.get("weights", np.ones(batch["targets"].shape, np.float32))
    batch["weights"] = (weights * scale).astype(np.float32)
    return batch

  def train_batch(self, step: int) -> dict:
    return self._weighted(self._data.train_batch(step), np.nan if step in self.bad_steps else 1)

  def val_batches(self) -> list[dict]:
    return [self._weighted(b, 1.0) for b in self._data.val_batches()]


def test_nan_batches_skip_then_stop_with_last_good_checkpoint(config_path, tmp_path,
                                                              monkeypatch):
  real = trainer.build_data
  # batch index i is consumed by step i+1: step 2 is skipped alone, steps 5,6,7 in a row stop
  monkeypatch.setattr(trainer, "build_data",
                      lambda *a, **k: NanBatches(real(*a, **k), {1, 4, 5, 6}))
  cfg = load_config_file(str(config_path))
  cfg.train.ckpt_every, cfg.train.keep_checkpoints, cfg.train.max_bad_steps = 1, 20, 3
  with pytest.raises(NonFiniteError, match="stopped at step 7: 3 consecutive"):
    trainer.train(cfg, tmp_path)
  rows = {r["step"]: r for r in metric_rows(tmp_path)}
  assert [s for s, r in rows.items() if r["nonfinite"]] == [2, 5, 6, 7]
  assert rows[4]["skipped_steps"] == 1 and rows[7]["skipped_steps"] == 4
  ckpt = Checkpointer(tmp_path, read_only=True)
  assert ckpt.all_steps() == [1, 2, 3, 4, 5, 6]  # nothing written at or after the stop
  abstract = trainer.build_run(cfg)
  params = {}
  for step in (1, 2, 3, 4, 6):
    state, _ = ckpt.restore(step, jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract.abstract_state, abstract.shardings))
    params[step] = [np.asarray(x) for x in jax.tree.leaves(state["params"])]
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(params[a], params[b]))  # noqa
  assert same(1, 2) and not same(2, 3)  # step 2 skipped, step 3 trained
  assert same(4, 6)  # 5 and 6 skipped: the newest checkpoint holds the last good params
  assert all(np.isfinite(x).all() for x in params[6])
