"""train.steps_per_call: k steps per jitted call (lax.scan) through the real trainer.

A run with 2 steps per call must log what the one-step-per-call run logs (same updates, only
fewer dispatches), resume from its checkpoints bit for bit, and refuse to resume from a
checkpoint that falls inside a call.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_config
from lmos_jax.config.loading import ConfigError
from lmos_jax.train import trainer

EXACT = ("loss", "grad_norm", "accuracy", "lr", "tokens", "eval_loss", "eval_accuracy")


def rows(workdir: Path) -> list[dict]:
  out = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: r[k] for k in ("step",) + EXACT if k in r} for r in out]


def config(steps_per_call: int, ckpt_every: int = 2):
  return tiny_config(steps=6, log_every=2, eval_every=2, ckpt_every=ckpt_every,
                     keep_checkpoints=6, steps_per_call=steps_per_call)


@pytest.fixture(scope="module")
def one_per_call(tmp_path_factory) -> Path:
  workdir = tmp_path_factory.mktemp("k1")
  trainer.train(config(1, ckpt_every=1), workdir)  # a checkpoint at every step
  return workdir


def test_two_steps_per_call_logs_the_same_run_and_resumes_exactly(one_per_call, tmp_path):
  k2 = tmp_path / "k2"
  trainer.train(config(2), k2)
  ref, got = rows(one_per_call), rows(k2)
  assert [r["step"] for r in got] == [2, 4, 6] == [r["step"] for r in ref]
  for a, b in zip(ref, got):
    for key in EXACT:
      # the same step computation, inside a scan: bit-equal in practice; rtol 1e-6 (~8 eps)
      # admits a last-bit change should XLA fuse the loop body differently
      np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=0, err_msg=f"{key} {a}")
  # resume inside the run: drop the step-6 checkpoint, rerun the same command
  resumed = tmp_path / "resumed"
  shutil.copytree(k2, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")
  trainer.train(config(2), resumed)
  assert rows(resumed) == got  # bitwise: the same program from the same state


def test_resuming_inside_a_call_is_a_config_error(one_per_call, tmp_path):
  workdir = tmp_path / "odd"
  shutil.copytree(one_per_call, workdir)
  for step in (4, 5, 6):  # newest left: step 3, not a multiple of 2
    shutil.rmtree(workdir / "checkpoints" / str(step))
  with pytest.raises(ConfigError, match=r"restored at step 3 .*'train.steps_per_call'=2"):
    trainer.train(config(2), workdir)


def test_eval_steps_are_evaluated_whatever_log_every_says(tmp_path):
  """eval_every need not be a multiple of log_every: every eval step is evaluated and logged
  (an epoch-long eval period with log_every=50 once evaluated only at the last step)."""
  trainer.train(tiny_config(steps=6, log_every=4, eval_every=3, ckpt_every=6), tmp_path)
  rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [3, 4, 6]
  assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
