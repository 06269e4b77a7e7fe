"""CPU-only hosts split into one XLA device per core (mesh.cpu_devices), before JAX starts."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import subprocess_env
from lmos_jax.config.loading import ConfigError, check_cpu_devices
from lmos_jax.config.schema import base_config
from lmos_jax.parallel.host_cpu import cpu_device_count

REPO = Path(__file__).resolve().parents[1]


def _mesh(**kw):
  m = base_config().mesh
  for k, v in kw.items():
    m[k] = v
  return m


@pytest.mark.parametrize("kw,batch,micro,cores,want", [
    ({}, 12, 1, 2, 2),  # nanoGPT's small shape on this 2-core machine
    ({}, 12, 1, 8, 6),  # the most devices <= cores that split the batch evenly
    ({}, 7, 1, 2, 1),  # odd batch: one device
    ({}, 16, 4, 8, 4),  # per-microbatch rows (4) bound it
    (dict(fsdp=2), 12, 1, 2, 1),  # an explicit layout keeps one device
    (dict(data=2), 12, 1, 2, 1),
    (dict(cpu_devices=3), 12, 1, 2, 3),  # explicit count wins
])
def test_cpu_device_count(kw, batch, micro, cores, want):
  assert cpu_device_count(_mesh(**kw), batch, micro, cores) == want


def test_negative_cpu_devices_names_the_field():
  cfg = base_config()
  cfg.mesh.cpu_devices = -1  # ConfigDict already refuses non-integers by type
  with pytest.raises(ConfigError, match="mesh.cpu_devices"):
    check_cpu_devices(cfg)


SCRIPT = """
import jax
from lmos_jax.config.schema import base_config
from lmos_jax.parallel.host_cpu import split_cpu_host
{before}
print("set", split_cpu_host(base_config().mesh, 12, 1, cores=2), "devices", len(jax.devices()))
"""


@pytest.mark.parametrize("before,xla_flags,want", [
    ("", "", "set 2 devices 2"),  # fresh process: split into 2
    ("", "--xla_force_host_platform_device_count=3", "set None devices 3"),  # user's flag wins
    ("jax.devices()", "", "set None devices 1"),  # backend already started: left alone
])
def test_split_cpu_host_in_a_fresh_process(before, xla_flags, want):
  env = subprocess_env()
  if xla_flags:
    env["XLA_FLAGS"] += " " + xla_flags
  out = subprocess.run([sys.executable, "-c", SCRIPT.format(before=before)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == want
  if before:  # says what it would have done instead of silently keeping one device
    assert "would use this host's 2 cores better" in out.stderr


TRAIN = """
import sys
sys.path.insert(0, {tests!r})
from helpers import tiny_config
from lmos_jax.train import trainer
c = tiny_config(steps=400, log_every=400, eval_every=400, ckpt_every=400)
c.mesh.cpu_devices = 2
last = trainer.train(c, {workdir!r})
import jax
print("devices", len(jax.devices()), "loss", last["loss"])
"""


def test_train_on_two_cpu_devices_never_deadlocks(tmp_path):
  """400 steps with no metric fetch in between on 2 CPU devices: with unbounded dispatch,
  XLA's CPU all-reduce rendezvous deadlocked here (and aborted the process after 40 s)."""
  env = subprocess_env()
  script = TRAIN.format(tests=str(REPO / "tests"), workdir=str(tmp_path / "run"))
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Termination timeout" not in out.stderr
  head, loss = out.stdout.strip().splitlines()[-1].rsplit(" ", 1)
  assert head == "devices 2 loss" and math.isfinite(float(loss))


def test_host_cpu_facts_come_from_the_first_processor():
  from lmos_jax.parallel.host_cpu import bf16_dot_flags, cpu_identity, cpu_model
  text = ("processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx512f amx_bf16 "
          "avx512_bf16\n\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n\n")
  assert cpu_model(text) == "AMD EPYC 9B14"
  assert cpu_identity(text) == ("model name: AMD EPYC 9B14\n"
                                "flags: fpu avx512f amx_bf16 avx512_bf16")
  assert bf16_dot_flags(text) == ["avx512_bf16", "amx_bf16"]
  assert bf16_dot_flags("processor\t: 0\nflags\t\t: fpu avx512f avx512bw\n") == []
  assert cpu_model("") == cpu_identity("") == "" and bf16_dot_flags("") == []
