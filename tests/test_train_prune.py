"""Pruning and QAT through `lmos train`: the prune/quant blocks, masks in the checkpoint.

Tiny GPT on the embedded corpus, 8 steps per run, in-process. The masks are optimizer state:
the final params are zero exactly where the checkpointed masks are False, and a resume from a
checkpoint after the ramp (the masks come only from it) ends bit-identical to the
uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import assert_trees_equal, tiny_config
from lmos_jax.compress.kernels import kernel_layouts
from lmos_jax.config.loading import ConfigError, validate
from lmos_jax.parallel.sharding import abstract_like, make_mesh
from lmos_jax.train import trainer
from lmos_jax.train.assemble import assemble_step
from lmos_jax.train.checkpoint import Checkpointer
from lmos_jax.train.losses import lm_loss
from lmos_jax.tree import key_path

VOCAB = 61


def gradual_config():
  """Magnitude pruning to 50%, cubic over updates 0..4 (recomputed at 0, 2, 4) of 8."""
  c = tiny_config(steps=8, log_every=2, eval_every=8, ckpt_every=2, keep_checkpoints=10)
  p = c.prune
  p.method, p.sparsity, p.schedule = "magnitude", 0.5, "gradual"
  p.begin_step, p.end_step, p.update_every = 0, 4, 2
  return c


def alpha_qat_config():
  """One-shot alpha pruning at step 4 of 8, trained with int8 QAT."""
  c = tiny_config(steps=8, log_every=2, eval_every=8, ckpt_every=2, keep_checkpoints=10)
  c.prune.method, c.prune.alpha, c.prune.schedule, c.prune.begin_step = "alpha", 0.3, \
      "oneshot", 4
  c.quant.qat = "int8"
  return c


def restored(cfg, workdir: Path, step: int) -> dict:
  """The train state of `workdir`'s checkpoint at `step`."""
  run = trainer.build_run(cfg)
  state, _ = Checkpointer(workdir).restore(step, abstract_like(run.abstract_state,
                                                                run.shardings))
  return jax.device_get(state)


def kernels(params: dict, layouts: dict) -> dict[tuple, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {key_path(p): np.asarray(x) for p, x in flat if key_path(p) in layouts}


def layouts_of(cfg, params: dict) -> dict:
  return kernel_layouts(trainer.build_run(cfg).graphdef, params)


@pytest.fixture(scope="module")
def gradual(tmp_path_factory) -> tuple[Path, dict]:
  workdir = tmp_path_factory.mktemp("gradual")
  last = trainer.train(gradual_config(), workdir)
  return workdir, last


def test_gradual_run_reaches_target_and_zeros_follow_checkpointed_masks(gradual):
  workdir, last = gradual
  cfg = gradual_config()
  state = restored(cfg, workdir, 8)
  params, masks = state["params"], state["opt_state"].masks
  layouts = layouts_of(cfg, params)
  assert set(kernels(masks, layouts)) == set(layouts)
  for path, w in kernels(params, layouts).items():
    m = kernels(masks, layouts)[path]
    assert m.shape == w.shape and m.dtype == bool
    assert np.all(w[~m] == 0.0), path  # pruned: exactly zero
    assert np.all(w[m] != 0.0), path  # kept ones trained (none landed on zero)
    per_layer = (~m).reshape(m.shape[0] if layouts[path].batch_ndim else 1, -1).mean(1)
    np.testing.assert_allclose(per_layer, 0.5, atol=0.5 / m[0].size, err_msg=str(path))
  assert last["sparsity"] == pytest.approx(0.5, abs=1e-3)
  rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(r["loss"]) for r in rows)


def test_resume_after_the_ramp_is_bit_identical(gradual, tmp_path):
  workdir, _ = gradual
  cfg = gradual_config()
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "8")  # newest left: step 6, masks final since 4
  mid = restored(cfg, resumed, 6)
  assert not all(np.all(m) for m in jax.tree.leaves(mid["opt_state"].masks))
  other = gradual_config()
  other.prune.sparsity = 0.6
  with pytest.raises(ConfigError, match=r"other pruning settings \(changed: prune.sparsity\)"):
    trainer.train(other, resumed)  # refused from the metadata: the masks belong to 0.5
  trainer.train(gradual_config(), resumed)
  assert_trees_equal(restored(cfg, resumed, 8), restored(cfg, workdir, 8))


def test_alpha_oneshot_sparsity_is_the_share_below_alpha_max_and_qat_trains(tmp_path):
  cfg = alpha_qat_config()
  last = trainer.train(cfg, tmp_path)
  at_prune = restored(cfg, tmp_path, 4)["params"]  # the weights update 4 starts from
  layouts = layouts_of(cfg, at_prune)
  below = total = 0
  for path, w in kernels(at_prune, layouts).items():
    v = np.abs(w).reshape(w.shape[0] if layouts[path].batch_ndim else 1, -1)
    below += int((v < np.float32(0.3) * v.max(axis=1, keepdims=True)).sum())
    total += v.size
  assert 0.05 < below / total < 0.95
  assert last["sparsity"] == pytest.approx(below / total, abs=1e-12)
  rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def fake_quant_int8_reference(params: dict, layouts: dict) -> dict:
  """Per-output-channel symmetric absmax int8 quantize-dequantize, in numpy."""
  def one(path, x):
    lay = layouts.get(key_path(path))
    if lay is None:
      return np.asarray(x)
    w = np.asarray(x, np.float32)
    lead = int(np.prod(w.shape[:lay.batch_ndim]))
    n_in = int(np.prod(w.shape[lay.batch_ndim:lay.batch_ndim + lay.in_ndim]))
    v = w.reshape(lead, n_in, -1)
    scale = np.abs(v).max(axis=1, keepdims=True) / np.float32(127)
    scale = np.where(scale == 0, np.float32(1), scale)
    q = np.clip(np.round(v / scale), -127, 127)
    return (q * scale).astype(np.float32).reshape(w.shape)
  return jax.tree_util.tree_map_with_path(one, params)


def test_qat_forward_is_the_model_with_fake_quantized_kernels():
  cfg = tiny_config()
  cfg.quant.qat, cfg.train.precision = "int8", "fp32"
  mesh = make_mesh((1, 1, 1), jax.devices()[:1])
  step = assemble_step(cfg, mesh, VOCAB)
  with jax.set_mesh(mesh):
    params = jax.device_get(jax.jit(step.init_fn)(jax.random.PRNGKey(1))["params"])
  ids = np.random.default_rng(0).integers(0, VOCAB, (4, 17))
  batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:]}
  layouts = kernel_layouts(step.graphdef, params)
  qat = step.step_cfg.loss_fn(nnx.merge(step.graphdef, params), batch, None)[0]
  ref = lm_loss(nnx.merge(step.graphdef, fake_quant_int8_reference(params, layouts)), batch,
                None)[0]
  plain = lm_loss(nnx.merge(step.graphdef, params), batch, None)[0]
  np.testing.assert_allclose(float(qat), float(ref), rtol=1e-5)
  assert float(qat) != float(plain)  # the kernels really were quantized


@pytest.mark.parametrize("field,value,match", [
    ("sparsity", 1.5, r"'prune.sparsity'=1.5 must be in \[0, 1\)"),
    ("method", "bogus", r"'prune.method'='bogus': expected one of none, alpha"),
    ("alpha", 0.0, r"'prune.alpha'=0.0 must be in \(0, 1\]"),
    ("end_step", 99, r"'prune.end_step'=99 must be after"),
    ("n", 4, r"'prune.n'=4 and 'prune.m'=4 must satisfy 0 < n < m"),
])
def test_bad_prune_values_are_config_errors_naming_the_field(field, value, match):
  cfg = tiny_config()
  cfg.prune.method = "magnitude" if field != "alpha" else "alpha"
  cfg.prune[field] = value
  with pytest.raises(ConfigError, match=match):
    validate(cfg, 8)


def test_bad_quant_and_nm_group_sizes_are_config_errors():
  cfg = tiny_config()
  cfg.quant.qat = "bogus"
  with pytest.raises(ConfigError, match=r"'quant.qat'='bogus'"):
    validate(cfg, 8)
  cfg = tiny_config()
  cfg.prune.method, cfg.prune.schedule, cfg.prune.n, cfg.prune.m = "nm", "oneshot", 2, 3
  validate(cfg, 8)
  with pytest.raises(ConfigError, match=r"'prune.m'=3 does not divide the input size 32"):
    assemble_step(cfg, make_mesh((1, 1, 1), jax.devices()[:1]), VOCAB)


def test_pruning_changes_allow_only_the_same_pruning_on_resume():
  now = json.loads(gradual_config().to_json())
  assert trainer.pruning_changes(now, now) == []
  unpruned = json.loads(tiny_config().to_json())
  older = {k: v for k, v in unpruned.items() if k != "prune"}  # saved before the block
  assert trainer.pruning_changes(older, unpruned) == []
  assert trainer.pruning_changes(older, now) == ["prune.end_step", "prune.method",
                                                  "prune.update_every"]
  knob = json.loads(tiny_config().to_json())
  knob["prune"]["sparsity"] = 0.9  # an unused knob of a run that prunes nothing
  assert trainer.pruning_changes(unpruned, knob) == []
