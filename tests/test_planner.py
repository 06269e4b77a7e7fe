"""`lmos plan`: compiled memory on 8 simulated devices, analytic targets, ranking, errors,
and the step it compiles being the one `lmos train` runs."""

import json

import jax
import pytest

from helpers import subprocess_env, tiny_config
from lmos_jax.config.loading import load_config_file, validate
from lmos_jax.config.schema import base_config
from lmos_jax.models.hf import minilm_dir
from lmos_jax.parallel.sharding import abstract_like, batch_sharding
from lmos_jax.train import plan as planner
from lmos_jax.train import plan_command
from lmos_jax.train import trainer
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
  cfg.mesh.opt_state = "replicated"
  s = planner.model_shape(cfg, 256, "cpu")
  data = planner.compiled_estimate(cfg, 256, Layout(8, 1, 1, 1, "none"), cpu8, s)
  fsdp = planner.compiled_estimate(cfg, 256, Layout(1, 8, 1, 1, "none"), cpu8, s)
  assert data.source.startswith("compiled") and fsdp.source.startswith("compiled")
  state_bytes = s.params * 4 * 4  # params, grads, Adam mu and nu in f32
  assert data.memory > state_bytes  # replicated: every device holds everything
  assert fsdp.memory < 0.4 * data.memory
  cfg.mesh.opt_state = "sharded"  # Adam moments split over the 8 data devices (ZeRO-1)
  s_zero = planner.model_shape(cfg, 256, "cpu")
  zero = planner.compiled_estimate(cfg, 256, Layout(8, 1, 1, 1, "none"), cpu8, s_zero)
  assert zero.memory < data.memory - 0.8 * s.params * 4 * 2 * 7 / 8
  for est, shape in ((data, s), (fsdp, s), (zero, s_zero)):  # analytic within 2x of XLA
    ana = planner.analytic_estimate(shape, est.layout, cpu8)
    assert 0.5 < ana.memory / est.memory < 2.0, (est.layout, ana.memory, est.memory)
  assert data.flops > 0 and fsdp.flops > 0
  # XLA counts a scanned layer stack's loop body once: the step is timed at no fewer FLOPs
  # than the model's own count
  for est, shape in ((data, s), (fsdp, s)):
    assert est.flops >= planner.analytic_estimate(shape, est.layout, cpu8).flops


def test_compiled_flops_of_a_scanned_stack_count_one_layer(cpu8):
  """Why the model count stands in: the compiled step of 4 scanned layers reports about the
  FLOPs of the same model unscanned divided by 4 (the loop body once)."""
  flops = {}
  for scan in (True, False):
    cfg = tiny_cfg()
    cfg.model.num_layers, cfg.model.scan_layers = 4, scan
    compiled = planner.build_step(cfg, 256, jax.devices()[:1]).compile()
    flops[scan] = planner.compiled_flops(compiled)
  assert flops[True] < 0.5 * flops[False]


def test_present_plan_ranks_fitting_layouts_and_overrides_validate(cpu8):
  cfg = tiny_cfg()
  plan = planner.make_plan(cfg, cpu8, remats=("none", "full"), max_microbatches=2,
                           compile_top=1, measure_steps=1)
  assert plan.best.source.startswith("compiled") and plan.best.fits
  # --measure ran the compiled candidate (only it): a real step time, and the peak memory
  # read from malloc (XLA:CPU keeps no allocator statistics) within the 15% target of what
  # XLA's buffer assignment said it would hold
  assert plan.best.measured_step_s > 0
  assert abs(plan.best.measured_peak / plan.best.memory - 1) < 0.15
  assert all(e.measured_step_s is None for e in plan.estimates if e.source == "analytic")
  rows = planner.plan_json(plan, plan.best)
  assert [r["chosen"] for r in rows].count(True) == 1 and rows[0]["chosen"]
  assert rows[0]["measured_step_s"] == plan.best.measured_step_s
  assert set(rows[0]) >= {"overrides", "predicted_step_s", "measured_step_s",
                          "predicted_alongside_step_s", "predicted_peak_bytes",
                          "measured_peak_bytes", "chosen"}
  assert "measured / est" in planner.format_table(plan)
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


def _priced(lay: Layout, step_s: float, collectives: float):
  return planner.Estimate(lay, 1e9, step_s, 1e12, "compiled HLO",
                          priced=planner.Priced(step_s / 2, step_s / 2, collectives))


def test_predictions_within_the_tie_rank_the_step_with_fewer_collectives_first(
    monkeypatch, capsys):
  """Sharded at 1.000 s with 32 collectives, data-parallel at 1.000 s x (1 + PRICE_TIE / 2)
  with 1: the data-parallel step is chosen and the table (or, with --json, stderr) says why;
  at 1 + 2 PRICE_TIE it is a finding, and the faster step is chosen."""
  dp, fsdp, tp = Layout(2, 1, 1, 4, "none"), Layout(1, 2, 1, 4, "none"), Layout(1, 1, 2, 4, "none")
  close = 1 + planner.PRICE_TIE / 2
  ranked = planner.rank_fitting([_priced(fsdp, 1.0, 32), _priced(dp, close, 1),
                                 _priced(tp, 1.5, 97),
                                 planner.Estimate(Layout(2, 1, 1, 1, "none"), 1e9, 0.5, 1e12,
                                                  "analytic")],
                                described=False)
  assert [e.layout for e in ranked][:3] == [dp, fsdp, tp]
  assert ranked[3].source == "analytic"  # never compiled: after every compiled layout
  plan = planner.Plan(planner.present_target(2, peak_flops=1e10), ranked,
                      planner.ModelShape(2, 128, 512, 4, 4, 256, 64, 8, 10**6, 1e6, 4, 4))
  note = "rank 1 within 2% of the fastest estimate (rank 2) with fewer collectives per step " \
         "(1 against 32)"
  assert note in planner.format_table(plan)
  monkeypatch.setattr(plan_command, "make_plan", lambda *a, **k: plan)
  assert plan_command.main(["lmos plan", "--config=configs/gpt2_124m.py", "--json",
                            "--no-calibrate"]) == 0
  out, err = capsys.readouterr()
  assert [r["chosen"] for r in json.loads(out)] == [True, False, False, False]
  assert note in err.splitlines()
  far = planner.rank_fitting([_priced(fsdp, 1.0, 32), _priced(dp, 1 + 2 * planner.PRICE_TIE, 1)],
                             described=False)
  assert [e.layout for e in far] == [fsdp, dp]
  assert planner.tie_note(planner.Plan(plan.target, far, plan.shape)) is None


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
  rc = plan_command.main(["lmos plan", "--config=configs/gpt2_124m.py", "--target=tpu-v5e-8",
                     f"--out={out}"])
  assert rc == 0
  best = json.loads(out.read_text())
  assert set(best) == {"mesh.data", "mesh.fsdp", "mesh.tensor", "train.microbatches",
                       "model.remat"}
  assert best["mesh.data"] * best["mesh.fsdp"] * best["mesh.tensor"] == 8
  text = capsys.readouterr().out
  assert "--config.mesh.fsdp=" in text and "analytic" in text
  rc = plan_command.main(["lmos plan", "--config=configs/gpt2_124m.py", "--target=h200x8",
                     "--memory-gib=0.01"])
  assert rc == 1 and "nothing fits" in capsys.readouterr().err


def test_compare_ranks_targets_by_the_plans_each_makes(capsys):
  """`lmos plan --compare`: each target keeps the first choice `--target` would print, the
  table runs fastest first, the device-seconds per token are step x devices / tokens, and a
  chip too small for the model says what its closest layout needs."""
  from lmos_jax.train import hardware
  cfg = load_config_file("configs/gpt2_124m.py")
  targets = hardware.parse_targets("t4x1,h100x1,h100x8,tpu-v5e-8")
  choices = hardware.compare_targets(cfg, targets, ("none", "dots_no_batch", "full"), 8)
  by = {c.name: c for c in choices}
  assert set(by) == {"t4x1", "h100x1", "h100x8", "tpu-v5e-8"}
  for name in ("h100x1", "h100x8", "tpu-v5e-8"):
    alone = planner.make_plan(cfg, planner.parse_target(name)).best
    assert by[name].best.layout == alone.layout and by[name].best.step_s == alone.step_s
  fit = [c for c in choices if c.best]
  assert [c.best.step_s for c in fit] == sorted(c.best.step_s for c in fit)
  assert choices[-1].name == "t4x1" and choices[-1].best is None  # 124M + Adam at batch 512
  assert choices[-1].needs_bytes > planner.MEMORY_HEADROOM * choices[-1].target.chip.memory
  tokens = 512 * 1024
  h8 = by["h100x8"]
  assert h8.device_s_per_mtok == pytest.approx(h8.best.step_s * 8 / tokens * 1e6)
  # eight H100s are faster than one; per token they spend at least as many device-seconds
  assert h8.best.step_s < by["h100x1"].best.step_s
  assert h8.device_s_per_mtok >= by["h100x1"].device_s_per_mtok * 0.99
  assert hardware.cheapest(choices) is min(fit, key=lambda c: c.device_s_per_mtok)
  assert plan_command.main(["lmos plan", "--config=configs/gpt2_124m.py",
                       "--compare=t4x1,h100x1,h100x8", "--json"]) == 0
  rows = json.loads(capsys.readouterr().out)
  assert [r["target"] for r in rows] == ["h100x8", "h100x1", "t4x1"]
  assert rows[0]["fastest"] and not rows[2]["fits"] and rows[2]["overrides"] is None
  assert sum(r["cheapest"] for r in rows) == 1
  assert plan_command.main(["lmos plan", "--config=configs/gpt2_124m.py", "--compare=t4x1"]) == 1
  assert "nothing fits on any target" in capsys.readouterr().out


def test_compare_all_covers_the_chip_table_and_refuses_other_modes():
  from lmos_jax.train import hardware
  from lmos_jax.train.metrics import CHIPS
  names = [planner.target_name(t.chip, t.num_devices) for t in hardware.parse_targets("all")]
  plannable = [c for c in CHIPS.values() if c.link_bw is not None]
  assert len(names) == 2 * len(plannable) and "h200x8" in names and "tpu-v5e-1" in names
  for flags in (["--target=h200x8"], ["--measure"], ["--devices=2"], ["--memory-gib=10"],
                ["--recalibrate"]):
    with pytest.raises(planner.PlanFlagError, match="--compare"):
      plan_command.parse(["lmos plan", "--config=configs/gpt2_124m.py", "--compare=all", *flags])
  with pytest.raises(planner.PlanFlagError, match="--target"):
    hardware.parse_targets("h100x1,h900x8")
  with pytest.raises(planner.PlanFlagError, match="--compare too"):
    plan_command.parse(["lmos plan", "--config=configs/gpt2_124m.py", "--prices=h100=2"])
  for bad in ("h900=2", "h100=0", "h100=cheap"):
    with pytest.raises(planner.PlanFlagError, match="--prices"):
      hardware.parse_prices(bad)


def test_compare_with_prices_ranks_cost_per_token(capsys):
  """Cost per 1M tokens = device-seconds per 1M tokens / 3600 x the device-hour price; the
  cheapest pick is the lowest cost among priced targets (an unpriced one shows none)."""
  from lmos_jax.train import hardware
  cfg = load_config_file("configs/gpt2_124m.py")
  prices = hardware.parse_prices("h100=2.5, b200=6")
  assert prices == {"h100": 2.5, "b200": 6.0}
  choices = hardware.compare_targets(
      cfg, hardware.parse_targets("h100x1,b200x8,tpu-v5e-8"), ("none", "dots_no_batch", "full"),
      8, prices)
  by = {c.name: c for c in choices}
  for name, price in (("h100x1", 2.5), ("b200x8", 6.0)):
    assert by[name].cost_per_mtok == pytest.approx(by[name].device_s_per_mtok / 3600 * price)
  assert by["tpu-v5e-8"].cost_per_mtok is None
  low = min((by["h100x1"], by["b200x8"]), key=lambda c: c.cost_per_mtok)
  assert hardware.cheapest(choices) is low
  text = hardware.format_comparison(choices, cfg)
  assert "cost per 1M tokens" in text and f"cheapest per token: {low.name}" in text


def test_cli_flags_use_dashes_like_the_other_commands():
  from lmos_jax.config.loading import ConfigError
  with pytest.raises(ConfigError, match="unknown flag --memory_gib"):
    plan_command.main(["lmos plan", "--config=configs/gpt2_124m.py", "--memory_gib=1"])


def test_plan_on_a_cpu_host_sees_the_devices_train_would(tmp_path):
  """A fresh `lmos plan` on a 2-core host splits it per core like `lmos train`, and its
  overrides keep that split (an explicit mesh alone would get one CPU device)."""
  import os
  import subprocess
  import sys
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) < 2:
    pytest.skip("needs a host with 2 cores to pin the plan to")
  out = tmp_path / "best.json"
  env = subprocess_env()
  pinned = (f"import os, sys; os.sched_setaffinity(0, {cores[:2]}); "
            "from lmos_jax.cli import main; sys.exit(main(sys.argv[1:]))")
  # configs/default.py: batch 16, one microbatch: 2 devices on this 2-core host
  res = subprocess.run([sys.executable, "-c", pinned, "plan",
                        "--config=configs/default.py", "--compile-top=1", "--remat=none",
                        "--max-microbatches=1", "--no-calibrate", f"--out={out}"], env=env,
                       text=True, capture_output=True, timeout=300)
  assert res.returncode == 0, res.stderr
  assert "plan for 2 x cpu" in res.stdout
  best = json.loads(out.read_text())
  assert best["mesh.cpu_devices"] == 2
  assert best["mesh.data"] * best["mesh.fsdp"] * best["mesh.tensor"] == 2


def write(path, text: str) -> str:
  path.write_text(text)
  return str(path)


def step_configs(tmp_path) -> dict:
  """Tiny runs of every task, plus packed batches and a LoRA finetune."""
  lm = tiny_config(steps=6, log_every=2, eval_every=2, ckpt_every=2)
  packed = tiny_config(microbatches=2)
  packed.data.batching, packed.model.dropout = "packed", 0.1
  lora = tiny_config()
  lora.peft.method, lora.peft.dropout = "lora", 0.1
  mlm = tiny_config()
  mlm.task, mlm.model.arch, mlm.model.mlp = "mlm", "bert", "gelu_exact"
  cls = tiny_config()
  cls.task, cls.model.arch, cls.model.mlp, cls.model.num_labels = "cls", "bert", "gelu_exact", 2
  cls.data.tokenizer, cls.data.tokenizer_path = "pretrained", str(minilm_dir())
  cls.data.train = write(tmp_path / "train.tsv",
                         "sentence\tlabel\n" + "a fine film\t1\ndull\t0\n" * 4)
  cls.data.dev = write(tmp_path / "dev.tsv", "sentence\tlabel\ndull\t0\n")
  return {"lm": lm, "packed": packed, "lora": lora, "mlm": mlm, "cls": cls}


def train_program(cfg, devices) -> str:
  """The train step `lmos train` jits for `cfg`, lowered for the real pipeline's batch."""
  run = trainer.build_run(cfg, devices)
  train_fn, _ = trainer.jit_steps(run)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(run.mesh, v.ndim))
           for k, v in run.data.train_batch(0).items()}  # one process: local rows are global
  with jax.set_mesh(run.mesh):
    return train_fn.lower(abstract_like(run.abstract_state, run.shardings), batch).as_text()


def plan_program(cfg, devices) -> str:
  """The train step `lmos plan` compiles for `cfg`, from the config alone."""
  return planner.build_step(cfg, planner.vocab_of(cfg), devices).lower().as_text()


def test_synthetic_batches_hold_valid_values():
  from lmos_jax.data.layout import ArraySpec
  import numpy as np
  ids = ArraySpec((4, 8), np.dtype(np.int32))
  spec = {"inputs": ids, "token_type_ids": ids, "attention_mask": ids, "positions": ids,
          "labels": ArraySpec((4,), np.dtype(np.int32))}
  b = planner.synthetic_batch(spec, vocab=50, num_labels=3)
  assert b["inputs"].min() >= 0 and b["inputs"].max() < 50
  assert set(np.unique(b["labels"])) <= {0, 1, 2}
  assert (b["attention_mask"] == 1).all() and (b["token_type_ids"] == 0).all()
  assert (b["positions"][2] == np.arange(8)).all()
  assert all(b[k].shape == spec[k].shape and b[k].dtype == spec[k].dtype for k in spec)


@pytest.mark.parametrize("name", ["lm", "packed", "lora", "mlm", "cls"])
def test_plan_compiles_the_step_train_runs(name, tmp_path):
  """Same state layout, shardings, batch keys/shapes/dtypes, loss and optimizer: the
  lowered programs are identical text."""
  cfg = step_configs(tmp_path)[name]
  devices = jax.devices()[:2]
  planned = plan_program(cfg, devices)
  assert planned == train_program(cfg, devices)
  if name == "lora":  # the comparison sees PEFT: the full finetune is another program
    cfg.peft.method = "full"
    assert plan_program(cfg, devices) != planned
