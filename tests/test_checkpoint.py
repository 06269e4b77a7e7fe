"""Checkpoint integrity, retention, resharded restore, params export and the non-finite guard.

All in-process on 8 simulated CPU devices with a tiny GPT; the kill/signal scenarios that
need a real process live in test_faults.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import assert_trees_equal, same_leaf_names, tiny_config
from lmos_jax.models.factory import model_factory
from lmos_jax.parallel.sharding import abstract_like, make_mesh
from lmos_jax.train import checkpoint as ck
from lmos_jax.train.export import export_params, load_export
from lmos_jax.train.losses import lm_loss
from lmos_jax.train.optim import make_optimizer
from lmos_jax.train.precision import resolve_policy
from lmos_jax.train.step import StepConfig, train_state_layout, train_step

VOCAB = 61


def layout(mesh_shape, devices=None):
  cfg = tiny_config(schedule="constant", warmup_steps=0)  # lr > 0 from the first step
  mesh = make_mesh(mesh_shape, devices)
  tx = make_optimizer(cfg.train)
  graphdef, init, abstract, shardings, _ = train_state_layout(
      model_factory(cfg.model, VOCAB), tx, resolve_policy("fp32", "cpu"), mesh)
  return cfg, mesh, tx, graphdef, init, abstract, shardings


def random_state(init, shardings, mesh, seed=0):
  """A state whose optimizer moments are non-zero too, so every leaf is checked."""
  def noisy(key):
    state = init(key)
    return jax.tree.map(lambda x: x * 1.5 + 0.25 if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, state)
  with jax.set_mesh(mesh):
    return jax.jit(noisy, out_shardings=shardings)(jax.random.PRNGKey(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Steps 1..3 of a (2,4,1)-mesh state saved asynchronously; step k holds state + k."""
  workdir = tmp_path_factory.mktemp("ckpt")
  cfg, mesh, _, _, init, abstract, shardings = layout((2, 4, 1))
  state = random_state(init, shardings, mesh)
  ckpt = ck.Checkpointer(workdir, keep=5)
  states = {}
  for step in (1, 2, 3):
    states[step] = jax.tree.map(lambda x: x + step, state)
    ckpt.save(step, states[step], {"step": step, "config": cfg.to_json()})
  ckpt.close()
  return workdir, states, abstract


def test_resharded_restore_onto_other_mesh_and_one_device(saved):
  workdir, states, _ = saved
  for shape, devices in (((1, 1, 8), None), ((1, 1, 1), jax.devices()[:1])):
    _, _, _, _, _, abstract, shardings = layout(shape, devices)
    ckpt = ck.Checkpointer(workdir, read_only=True)
    state, meta = ckpt.restore_verified(3, abstract_like(abstract, shardings))
    ckpt.close()
    assert meta["step"] == 3
    assert_trees_equal(state, states[3])
    for x, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
      assert x.sharding.is_equivalent_to(sh, x.ndim), (x.sharding, sh)
    assert len(jax.tree.leaves(state)[0].sharding.device_set) == len(devices or jax.devices())


def copy_checkpoints(src: Path, dst: Path) -> Path:
  import shutil
  shutil.copytree(src / "checkpoints", dst / "checkpoints")
  return dst


def data_files(step_dir: Path) -> list[Path]:
  """The tensorstore chunk files of a step (small ones are superseded B-tree nodes)."""
  return [p for p in (step_dir / "state").rglob("d/*") if p.is_file() and p.stat().st_size > 1024]


def test_truncated_and_bitflipped_checkpoints_fall_back_to_last_good(saved, tmp_path):
  src, states, abstract = saved
  workdir = copy_checkpoints(src, tmp_path)
  cdir = workdir / "checkpoints"
  for f in data_files(cdir / "3"):  # truncated tensorstore files (a disk filled mid-copy)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  for f in data_files(cdir / "2"):  # one flipped byte in the middle of every chunk file
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
  _, _, _, _, _, _, shardings = layout((2, 4, 1))
  logs: list[str] = []
  ckpt = ck.Checkpointer(workdir)
  step, state, meta = ck.restore_latest_good(ckpt, abstract_like(abstract, shardings),
                                             log=logs.append)
  assert step == 1 and meta["step"] == 1
  assert_trees_equal(state, states[1])
  text = "\n".join(logs)
  assert str(cdir / "3") in text and str(cdir / "2") in text, text
  assert ckpt.all_steps() == [1]  # the bad ones are moved aside, never deleted
  moved = sorted(p.name.split("-")[0] for p in (workdir / ck.CORRUPT_DIR).iterdir())
  assert moved == ["2", "3"]
  ckpt.close()


def test_all_checkpoints_bad_is_an_error_naming_them(saved, tmp_path):
  src, _, abstract = saved
  workdir = copy_checkpoints(src, tmp_path)
  for step in (1, 2, 3):
    (workdir / "checkpoints" / str(step) / "meta" / "metadata").write_text("{trunc")
  _, _, _, _, _, _, shardings = layout((2, 4, 1))
  ckpt = ck.Checkpointer(workdir)
  with pytest.raises(ck.CheckpointError, match=r"no readable checkpoint.*checkpoints/3"):
    ck.restore_latest_good(ckpt, abstract_like(abstract, shardings), log=lambda s: None)
  assert ckpt.all_steps() == [1, 2, 3]  # nothing moved when there is nothing to fall back to
  ckpt.close()


def test_half_written_step_is_never_listed_and_is_cleaned(saved, tmp_path):
  import shutil
  src, _, _ = saved
  workdir = copy_checkpoints(src, tmp_path)
  cdir = workdir / "checkpoints"
  tmp = cdir / "4.orbax-checkpoint-tmp-1764300000"  # what a kill during orbax's write leaves
  shutil.copytree(cdir / "3", tmp)
  (tmp / "commit_success.txt").unlink()
  for p in data_files(tmp)[::2]:
    p.unlink()
  ro = ck.Checkpointer(workdir, read_only=True)
  assert ro.latest_step() == 3
  ro.close()
  resumed = ck.Checkpointer(workdir, keep=5)  # a resumed run cleans it up when it saves
  resumed.save(4, {"w": jnp.ones(8)}, {"step": 4})
  resumed.close()
  assert not tmp.exists() and sorted(p.name for p in cdir.iterdir()) == ["1", "2", "3", "4"]


def test_keep_last_n_plus_best_k(tmp_path):
  _, mesh, _, _, init, _, shardings = layout((8, 1, 1))
  state = {"w": jnp.arange(8.0)}
  ckpt = ck.Checkpointer(tmp_path, keep=2, keep_best=1, best_metric="eval_loss")
  losses = {1: 0.5, 2: 0.1, 3: 0.4, 4: None, 5: 0.6}
  for step, loss in losses.items():
    metrics = None if loss is None else {"eval_loss": loss}
    ckpt.save(step, state, {"step": step}, metrics=metrics)
    ckpt.wait()
  assert ckpt.all_steps() == [2, 4, 5]  # newest two + best (2) by eval_loss
  ckpt.close()


def test_unwritable_or_full_workdir_fails_at_start_naming_it(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(ck.CheckpointError, match=r"cannot write checkpoints to .*a_file"):
    ck.check_writable(blocker / "run" / "checkpoints")
  with pytest.raises(ck.CheckpointError, match=r"MiB free but one checkpoint needs"):
    ck.check_writable(tmp_path / "ok", needed_bytes=1 << 60)


def test_unwritable_workdir_stops_train_before_compiling(tmp_path):
  from lmos_jax.train import trainer
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(ck.CheckpointError, match="cannot write checkpoints to"):
    trainer.train(tiny_config(), blocker / "run")


def test_drop_metric_rows_after_resume_point(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 7))
                  + '{"step": 7, "lo')  # a row cut by kill -9
  assert ck.drop_metric_rows_after(path, 4) == 3
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_fingerprint_is_mesh_independent_and_sensitive():
  x = jnp.arange(64, dtype=jnp.float32).reshape(8, 8)
  mesh = make_mesh((2, 4, 1))
  with jax.set_mesh(mesh):
    y = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "fsdp")))
  assert ck.fingerprint({"x": x}) == ck.fingerprint({"x": y})
  swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])  # same sum, different layout
  assert ck.fingerprint({"x": swapped}) != ck.fingerprint({"x": x})
  assert ck.fingerprint({"b": x.astype(jnp.bfloat16)}) != ck.fingerprint(
      {"b": (x + 1).astype(jnp.bfloat16)})


def test_nonfinite_guard_skips_update_and_counts():
  cfg, mesh, tx, graphdef, init, _, shardings = layout((8, 1, 1))
  step_cfg = StepConfig(graphdef=graphdef, tx=tx, loss_fn=lm_loss,
                        policy=resolve_policy("fp32", "cpu"))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (8, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": np.ones((8, 16), np.float32)}
  bad = dict(batch, weights=np.where(np.arange(16) == 3, np.nan, 1.0).astype(np.float32)[None]
             .repeat(8, 0))
  step_fn = jax.jit(lambda s, b: train_step(step_cfg, s, b))
  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
    skipped, m_bad = step_fn(state, bad)
    taken, m_ok = step_fn(state, batch)
  assert float(m_bad["nonfinite"]) == 1.0 and not np.isfinite(float(m_bad["loss"]))
  assert float(m_ok["nonfinite"]) == 0.0
  assert_trees_equal(skipped["params"], state["params"])
  assert_trees_equal(skipped["opt_state"], state["opt_state"])
  assert int(skipped["step"]) == 1  # the step and RNG advance: the next batch is a new one
  assert not np.array_equal(np.asarray(skipped["rng"]), np.asarray(state["rng"]))
  after, before = same_leaf_names(taken["params"], state["params"])
  assert [k for k in after if np.array_equal(after[k], before[k])] == []


def test_export_params_bf16_loads_without_optimizer(saved, tmp_path):
  workdir, states, _ = saved
  (workdir / "tokenizer.json").write_text('{"kind": "byte"}')
  out = export_params(workdir, tmp_path / "export", dtype="bfloat16")
  info = json.loads((out / "export.json").read_text())
  assert info["step"] == 3 and info["dtype"] == "bfloat16"
  assert (out / "tokenizer.json").exists() and json.loads((out / "config.json").read_text())
  params = load_export(out)
  expected = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x,
                          states[3]["params"])
  assert_trees_equal(params, expected)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  # usable as a model with nothing but the export: forward pass in bf16
  cfg = tiny_config()
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_factory(cfg.model, VOCAB)(
      nnx.Rngs(0))))
  model = nnx.merge(graphdef, params)
  logits = model(jnp.zeros((1, 8), jnp.int32))
  assert logits.shape == (1, 8, VOCAB) and bool(jnp.isfinite(logits).all())
  size = sum(p.stat().st_size for p in (out / "params").rglob("*") if p.is_file())
  train_size = sum(p.stat().st_size for p in (workdir / "checkpoints" / "3").rglob("*")
                   if p.is_file())
  assert size < train_size / 2  # no optimizer moments, half-width floats


def test_failed_save_names_the_step_and_keeps_older_ones(tmp_path, monkeypatch):
  import errno
  import orbax.checkpoint as ocp
  ckpt = ck.Checkpointer(tmp_path, keep=2)
  ckpt.save(1, {"w": jnp.ones(8)}, {"step": 1})
  ckpt.wait()

  def disk_full(self, step, *a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
  with pytest.raises(ck.CheckpointError, match=r"checkpoints/2 failed.*No space left.*\[1\]"):
    ckpt.save(2, {"w": jnp.zeros(8)}, {"step": 2})
  monkeypatch.undo()
  assert ckpt.all_steps() == [1]
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state, _ = ckpt.restore(1, {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=one)})
  np.testing.assert_array_equal(np.asarray(state["w"]), np.ones(8))
  ckpt.close()
