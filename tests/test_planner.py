"""`lmos plan`: compiled memory on 8 simulated devices, analytic targets, ranking, errors."""

import json

import pytest

from lmos_jax.config.loading import load_config_file, validate
from lmos_jax.config.schema import base_config
from lmos_jax.train import plan as planner
from lmos_jax.train.plan import Layout, PlanError


def tiny_cfg():
  """Params dominate activations here, so fsdp's division of the state shows clearly."""
  c = base_config()
  c.model.num_layers, c.model.num_heads, c.model.d_model, c.model.max_seq_len = 2, 4, 128, 16
  c.data.seq_len, c.train.batch_size = 16, 8
  return c


@pytest.fixture(scope="module")
def cpu8():
  return planner.present_target(8, peak_flops=1e10)


def test_fsdp_divides_state_in_compiled_memory(cpu8):
  cfg = tiny_cfg()
  s = planner.model_shape(cfg, 256, "cpu")
  data = planner.compiled_estimate(cfg, 256, Layout(8, 1, 1, 1, "none"), cpu8, s)
  fsdp = planner.compiled_estimate(cfg, 256, Layout(1, 8, 1, 1, "none"), cpu8, s)
  assert data.source == fsdp.source == "compiled"
  state_bytes = s.params * 4 * 4  # params, grads, Adam mu and nu in f32
  assert data.memory > state_bytes  # replicated: every device holds everything
  assert fsdp.memory < 0.4 * data.memory
  for est in (data, fsdp):  # the analytic model stays within 2x of the compiler
    ana = planner.analytic_estimate(s, est.layout, cpu8)
    assert 0.5 < ana.memory / est.memory < 2.0, (est.layout, ana.memory, est.memory)
  assert data.flops > 0 and fsdp.flops > 0


def test_present_plan_ranks_fitting_layouts_and_overrides_validate(cpu8):
  cfg = tiny_cfg()
  plan = planner.make_plan(cfg, cpu8, remats=("none", "full"), max_microbatches=2,
                           compile_top=1)
  assert plan.best.source == "compiled" and plan.best.fits
  fitting = [e for e in plan.estimates if e.fits]
  analytic = [e.step_s for e in fitting if e.source == "analytic"]
  assert analytic == sorted(analytic)
  meshes = {(e.layout.data, e.layout.fsdp, e.layout.tensor) for e in plan.estimates}
  assert {(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)} <= meshes
  assert all(4 % e.layout.tensor == 0 for e in plan.estimates)  # tensor divides the heads
  best = planner.apply_overrides(cfg, plan.best.layout.overrides())
  validate(best, 8)
  assert "compiled" in planner.format_table(plan)


def test_described_h200_plan_for_gpt2_is_analytic_and_fits():
  cfg = load_config_file("configs/gpt2_124m.py")
  target = planner.parse_target("h200x8")
  plan = planner.make_plan(cfg, target)
  assert 120e6 < plan.shape.params < 130e6 and plan.shape.compute_bytes == 2
  assert all(e.source == "analytic" for e in plan.estimates)
  assert plan.best.fits and plan.best.memory <= planner.MEMORY_HEADROOM * target.chip.memory
  by = {e.layout: e for e in plan.estimates}
  data = by[Layout(8, 1, 1, 1, "full")].memory
  fsdp = by[Layout(1, 8, 1, 1, "full")].memory
  assert fsdp < data  # fsdp shards params + optimizer state
  steps = [e.step_s for e in plan.estimates if e.fits]
  assert steps == sorted(steps)


def test_nothing_fits_says_what_would():
  cfg = load_config_file("configs/gpt2_124m.py")
  t = planner.parse_target("tpu-v5e-8")
  t = planner.Target(planner.dataclasses.replace(t.chip, memory=0.2 * planner.GiB), 8, True)
  with pytest.raises(PlanError) as e:
    planner.make_plan(cfg, t, remats=("none",))
  msg = str(e.value)
  assert "nothing fits in 0.18 GiB" in msg and "- no device count" in msg
  assert "remat" in msg and "smaller model" in msg


@pytest.mark.parametrize("spec", ["h900x8", "tpu-v5e", "h200x0"])
def test_bad_target_names_the_flag(spec):
  with pytest.raises(PlanError, match="--target"):
    planner.parse_target(spec)


def test_cli_writes_best_overrides(tmp_path, capsys):
  out = tmp_path / "best.json"
  rc = planner.main(["lmos plan", "--config=configs/gpt2_124m.py", "--target=tpu-v5e-8",
                     f"--out={out}"])
  assert rc == 0
  best = json.loads(out.read_text())
  assert set(best) == {"mesh.data", "mesh.fsdp", "mesh.tensor", "train.microbatches",
                       "model.remat"}
  assert best["mesh.data"] * best["mesh.fsdp"] * best["mesh.tensor"] == 8
  text = capsys.readouterr().out
  assert "--config.mesh.fsdp=" in text and "analytic" in text
  rc = planner.main(["lmos plan", "--config=configs/gpt2_124m.py", "--target=h200x8",
                     "--memory_gib=0.01"])
  assert rc == 1 and "nothing fits" in capsys.readouterr().err


def test_plan_on_a_cpu_host_sees_the_devices_train_would(tmp_path):
  """A fresh `lmos plan` splits a CPU host per core like `lmos train`, and its overrides
  keep that split (an explicit mesh alone would get one CPU device)."""
  import os
  import subprocess
  import sys
  from lmos_jax.parallel.distributed import cpu_device_count
  cfg = load_config_file("configs/default.py")
  want = cpu_device_count(cfg.mesh, cfg.train.batch_size, cfg.train.microbatches,
                          len(os.sched_getaffinity(0)))
  out = tmp_path / "best.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  res = subprocess.run([sys.executable, "-m", "lmos_jax.cli", "plan",
                        "--config=configs/default.py", "--compile_top=1", "--remat=none",
                        "--max_microbatches=1", f"--out={out}"], env=env, text=True,
                       capture_output=True, timeout=300)
  assert res.returncode == 0, res.stderr
  assert f"plan for {want} x cpu" in res.stdout
  best = json.loads(out.read_text())
  assert best.get("mesh.cpu_devices", 1) == want
  assert best["mesh.data"] * best["mesh.fsdp"] * best["mesh.tensor"] == want
