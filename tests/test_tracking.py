"""Tracking: W&B in offline mode (records read back from the run file), hyperparameters sent
once, TensorBoard scalars equal to metrics.jsonl, and a jax.profiler trace of exactly the
configured step range."""

import gzip
import json
import math
import struct

import numpy as np
import pytest

from lmos_jax.config.schema import base_config
from lmos_jax.train import tracking


def _tiny(steps: int = 3):
  c = base_config()
  m, d, t = c.model, c.data, c.train
  m.num_layers, m.num_heads, m.d_model, m.max_seq_len = 1, 2, 32, 16
  d.seq_len, d.max_chars = 16, 20000
  t.batch_size, t.steps, t.lr, t.schedule, t.warmup_steps = 8, steps, 1e-2, "constant", 0
  t.log_every, t.eval_every, t.ckpt_every, t.eval_batches = 1, 100, 100, 1
  t.sample_tokens, t.progress, t.precision = 0, False, "fp32"
  return c


def read_wandb_records(path):
  """Records of a .wandb file: a 7-byte W&B header, then LevelDB-log framing (32 KiB blocks;
  7-byte chunk headers: crc32c, little-endian length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4)."""
  from wandb.proto import wandb_internal_pb2 as pb
  data = path.read_bytes()
  assert data[:4] == b":W&B", data[:8]
  pos, block, records, partial = 7, 32768, [], b""
  while pos + 7 <= len(data):
    left = block - pos % block
    if left < 7:  # block trailer padding
      pos += left
      continue
    length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
    chunk = data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind == 0 and length == 0:
      continue
    partial = chunk if kind in (1, 2) else partial + chunk
    if kind in (1, 4):
      rec = pb.Record()
      rec.ParseFromString(partial)
      records.append(rec)
  return records


def read_tensorboard_scalars(tb_dir):
  """{tag: [(step, value)]} from TensorBoard event files: TFRecord framing (little-endian
  uint64 length, masked crc32c of it, the Event proto, masked crc32c of it), checked."""
  from tensorboardX.crc32c import crc32c
  from tensorboardX.proto.event_pb2 import Event

  def masked(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

  scalars = {}
  for path in sorted(tb_dir.glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,), (length_crc,) = struct.unpack("<Q", header), struct.unpack(
          "<I", data[pos + 8:pos + 12])
      body = data[pos + 12:pos + 12 + length]
      (body_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
      assert masked(header) == length_crc and masked(body) == body_crc, f"{path} at {pos}"
      pos += 16 + length
      event = Event.FromString(body)
      for v in event.summary.value:
        if v.HasField("simple_value"):
          scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
  return scalars


def test_wandb_offline_hparams_once_and_profile_window(tmp_path, monkeypatch):
  from lmos_jax.train.trainer import train
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  cfg = _tiny(steps=3)
  cfg.tracking.wandb = True
  cfg.tracking.wandb_tags = "ci,tiny"
  cfg.tracking.profile_start_step, cfg.tracking.profile_steps = 1, 2  # updates 1 and 2
  wd = tmp_path / "run"
  train(cfg, wd)

  run_id = (wd / "wandb_run_id").read_text()
  (run_dir,) = (wd / "wandb").glob(f"offline-run-*-{run_id}")
  records = read_wandb_records(run_dir / f"run-{run_id}.wandb")
  kinds = [r.WhichOneof("record_type") for r in records]
  (run_rec,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
  assert run_rec.run_id == run_id and run_rec.display_name == "run"
  assert list(run_rec.tags) == ["ci", "tiny"]
  # the hyperparameters travel once (at init); later config records only carry wandb's own keys
  hp = [{u.key: json.loads(u.value_json) for u in r.config.update}
        for r in records if r.WhichOneof("record_type") == "config"]
  hp += [{u.key: json.loads(u.value_json) for u in run_rec.config.update}]
  with_lr = [h for h in hp if "train.lr" in h]
  assert len(with_lr) == 1 and with_lr[0]["train.lr"] == 1e-2
  assert with_lr[0]["model.d_model"] == 32 and with_lr[0]["tracking.wandb"] is True
  # history rows equal metrics.jsonl
  logged = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
  hist = []
  for r in records:
    if r.WhichOneof("record_type") == "history":
      items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
      hist.append(items)
  assert [h["_step"] for h in hist] == [1, 2, 3] and "history" in kinds
  # f32 losses widened to float64 in metrics.jsonl: wandb's JSON copy is exact, and rel 1e-6
  # would also admit a float32 copy (2^-24 = 6e-8)
  assert [h["loss"] for h in hist] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
  # TensorBoard holds every finite scalar of every metrics.jsonl row, as float32 (the first
  # row's rates are NaN: no interval measured yet)
  tb = read_tensorboard_scalars(wd / "tb")
  want = {}
  for row in logged:
    for k, v in row.items():
      if k != "step" and math.isfinite(v):
        want.setdefault(k, []).append((row["step"], v))
  assert sorted(tb) == sorted(want) and {"loss", "lr", "grad_norm"} <= set(tb)
  for tag, points in want.items():
    assert [s for s, _ in tb[tag]] == [s for s, _ in points], tag
    np.testing.assert_array_equal(np.array([v for _, v in tb[tag]], np.float32),
                                  np.array([v for _, v in points], np.float32), err_msg=tag)

  # the profiler covered exactly updates 1 and 2 (StepTraceAnnotation step numbers)
  (trace,) = (wd / "profile" / "process_0").rglob("*.trace.json.gz")
  assert list((wd / "profile" / "process_0").rglob("*.xplane.pb"))
  events = json.load(gzip.open(trace))["traceEvents"]
  steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train")
  assert steps == [1, 2]


def test_check_tracking_errors_name_the_field():
  c = base_config()
  c.tracking.wandb_mode = "cloud"
  with pytest.raises(tracking.TrackingError, match="tracking.wandb_mode"):
    tracking.check_tracking(c.tracking)
  c = base_config()
  c.tracking.profile_start_step, c.tracking.profile_steps = 5, 0
  with pytest.raises(tracking.TrackingError, match="tracking.profile_steps"):
    tracking.check_tracking(c.tracking)


def test_profile_window_and_flat_hparams():
  c = base_config()
  assert tracking.profile_window(c.tracking) is None
  c.tracking.profile_start_step, c.tracking.profile_steps = 10, 3
  assert tracking.profile_window(c.tracking) == (10, 13)
  flat = tracking.flat_hparams(c)
  assert flat["model.d_model"] == c.model.d_model and flat["tracking.profile_steps"] == 3
  assert not any(isinstance(v, dict) for v in flat.values())


def test_tensorboard_writer_loads_without_torch(tmp_path):
  """A fresh process opens the TensorBoard writer without importing torch (installed here: the
  `torch` extra) or boto3, its scalars read back, and torch still imports normally afterwards."""
  import subprocess
  import sys
  pytest.importorskip("torch")
  code = (
      "import sys\n"
      "from lmos_jax.train.metrics import MetricWriter\n"
      f"w = MetricWriter(__import__('pathlib').Path({str(tmp_path)!r}))\n"
      "w.write(7, {'loss': 1.5, 'mfu': float('nan')})\n"
      "w.close()\n"
      "print('torch' in sys.modules, 'boto3' in sys.modules)\n"
      "import torch\n"
      "print(torch.ones(2).sum().item())\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["False", "False", "2.0"]
  # the NaN (a first step's rate) is kept in the JSONL and left out of TensorBoard, which
  # would log a warning for it
  assert read_tensorboard_scalars(tmp_path / "tb") == {"loss": [(7, 1.5)]}
  assert "NaN or Inf" not in out.stderr
  assert math.isnan(json.loads((tmp_path / "metrics.jsonl").read_text())["mfu"])
