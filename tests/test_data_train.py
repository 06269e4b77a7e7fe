"""The pipeline inside `lmos train`: data state in checkpoints, resume checks, input wait."""

import json
import time

import pytest

from helpers import tiny_config
from lmos_jax.data.build import MixtureData
from lmos_jax.train.checkpoint import Checkpointer
from lmos_jax.train.trainer import build_run, init_or_restore, train


def test_train_saves_data_state_reports_wait_and_checks_it_on_resume(tmp_path, monkeypatch):
  docs = [f"doc {i} " + "abc " * (i % 7) for i in range(60)]
  data = tmp_path / "docs.jsonl"
  data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  cfg = tiny_config(steps=4, eval_every=4, ckpt_every=4)  # no save inside a timed window
  cfg.data.source, cfg.data.path, cfg.data.batching = "files", str(data), "packed"
  cfg.data.tokenizer = "bpe"
  cfg.data.bpe_vocab_size = 280
  cfg.data.prefetch = 0  # batches made inline: every second the data takes is waited for
  slow = 0.5
  real = MixtureData.train_batch

  def slow_batch(self, step):
    time.sleep(slow)
    return real(self, step)

  monkeypatch.setattr(MixtureData, "train_batch", slow_batch)
  workdir = tmp_path / "run"
  train(cfg, workdir)
  monkeypatch.undo()
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  waits = [r["data_wait_frac"] for r in rows if r["step"] in (2, 4)]
  # 0.5 s of waiting per batch against a tiny model's steps: most of each window between log
  # points, and 0 if the wait went uncounted
  assert len(waits) == 2 and all(0.2 < w <= 1.0 for w in waits), waits
  meta = json.loads((workdir / "checkpoints" / "4" / "meta" / "metadata").read_text())
  state = meta["data_state"]
  assert state["kind"] == "packed" and state["rows_consumed"] == [4 * 8]
  assert len(list((workdir / "tokenizer").glob("bpe_v280_*.json"))) == 1
  cfg.data.path = str(tmp_path / "other.jsonl")  # resuming on different data must refuse
  (tmp_path / "other.jsonl").write_text(data.read_text().replace("abc", "xyz"))
  run = build_run(cfg, workdir=workdir)  # what a resume does, short of compiling the step
  with pytest.raises(ValueError, match="data state differs"):
    init_or_restore(run, Checkpointer(workdir, keep=3))
