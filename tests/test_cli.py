"""`lmos train` end to end in a subprocess: checkpoint, metrics.jsonl, a second run of the same
config compiling nothing (persistent compilation cache), resume, config errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def _lmos(*args, timeout=300):
  env = subprocess_env(2, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "lmos_jax.cli", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


TINY = ["--config=configs/default.py", "--config.model.num_layers=1",
        "--config.model.d_model=32", "--config.model.max_seq_len=32", "--config.data.seq_len=32",
        "--config.data.max_chars=200000", "--config.train.batch_size=4",
        "--config.train.log_every=2", "--config.train.eval_every=2",
        "--config.train.ckpt_every=2", "--config.train.eval_batches=1",
        "--config.train.sample_tokens=8", "--config.train.progress=False"]


@pytest.mark.slow
def test_train_writes_metrics_checkpoints_and_resumes(tmp_path):
  wd, cache = tmp_path / "run", tmp_path / "cache"
  # a run directory of its own for the compilation cache; constant LR so that the resume
  # below (more steps) keeps the same train step
  own_cache = f"--config.train.compile_cache={cache}"
  constant = "--config.train.schedule=constant"
  first = _lmos("train", *TINY, "--config.train.steps=4", own_cache, constant, f"--workdir={wd}")
  assert first.returncode == 0, first.stderr[-3000:]
  assert f"compile cache {cache} (train.compile_cache)" in first.stdout
  assert "first step done" in first.stdout and "2 traced program(s) stored" in first.stdout
  compiled = sorted(p.name for p in cache.iterdir())
  assert compiled
  rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 4]
  for key in ("loss", "eval_loss", "lr", "tokens_per_sec", "mfu"):
    assert key in rows[-1]
  steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 4
  assert "--- sample ---" in first.stdout
  assert (wd / "tb").is_dir() and any((wd / "tb").iterdir())

  again = _lmos("train", *TINY, "--config.train.steps=4", own_cache, constant,
                f"--workdir={tmp_path / 'again'}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert sorted(p.name for p in cache.iterdir()) == compiled  # the same config compiled nothing
  assert "2 traced program(s) read back" in again.stdout  # ... and traced nothing
  # the stored programs compute what the directly jitted ones do: same losses without a cache
  off = _lmos("train", *TINY, "--config.train.steps=4", "--config.train.compile_cache=off",
              constant, f"--workdir={tmp_path / 'off'}")
  assert off.returncode == 0, off.stderr[-3000:]
  assert "traced program" not in off.stdout
  losses = {name: [json.loads(l)["loss"] for l in (tmp_path / name / "metrics.jsonl")
                   .read_text().splitlines()] for name in ("run", "again", "off")}
  assert losses["run"] == losses["again"] == losses["off"], losses

  second = _lmos("train", *TINY, "--config.train.steps=6", own_cache, constant,
                 f"--workdir={wd}")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resuming at step 4" in second.stdout
  rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 4, 6]


def test_config_error_exits_before_compile(tmp_path):
  out = _lmos("train", *TINY, "--config.data.seq_len=64", f"--workdir={tmp_path / 'bad'}")
  assert out.returncode == 2
  assert "'data.seq_len'=64" in out.stderr
  assert not (tmp_path / "bad" / "checkpoints").exists()


def test_unknown_override_is_rejected(tmp_path):
  out = _lmos("train", *TINY, "--config.train.learning_rate=0.1", f"--workdir={tmp_path}")
  assert out.returncode != 0
  assert "learning_rate" in out.stderr


def test_command_line_process_skips_the_ipython_probe(monkeypatch):
  """The `lmos` process marks IPython absent before flax.nnx probes for it, and the trainer
  still imports; a process that already holds IPython (a notebook) keeps it."""
  code = ("import sys; from lmos_jax import cli; cli.skip_ipython_probe(); "
          "import lmos_jax.train.trainer; "
          "print(sys.modules['IPython'] is None, any(m.startswith('IPython.') for m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=subprocess_env(1, JAX_PLATFORMS="cpu"), timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["True", "False"]
  from lmos_jax import cli
  shell = object()
  monkeypatch.setitem(sys.modules, "IPython", shell)
  cli.skip_ipython_probe()
  assert sys.modules["IPython"] is shell


def test_console_script_imports_its_command_with_the_collector_paused_then_frozen():
  """In its own process the command's module is imported while the collector is off (a
  pass inside the import would see it disabled), the import's objects are frozen after, and
  the collector is on again; main(argv) called from another program leaves both alone."""
  code = ("import gc, sys; from lmos_jax import cli\n"
          "seen = []\n"
          "class Finder:\n"  # looks at the collector while the import runs, finds nothing
          "  def find_spec(self, name, path=None, target=None):\n"
          "    if name == 'colorsys': seen.append(gc.isenabled())\n"
          "sys.meta_path.insert(0, Finder())\n"
          "before = gc.get_freeze_count()\n"
          "cli.import_command('colorsys', own_process=True)\n"
          "mid = gc.get_freeze_count()\n"
          "cli.import_command('wave', own_process=False)\n"
          "print(seen, mid > before, gc.get_freeze_count() == mid, gc.isenabled())")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=subprocess_env(1, JAX_PLATFORMS="cpu"), timeout=60)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["[False]", "True", "True", "True"]
