"""Multi-host for real: two `lmos train` processes over loopback (gloo CPU collectives), each
with 4 simulated devices, train, checkpoint, restart and resume; the losses must equal a
single-process run on the same 8-device global mesh. Plus the start-up errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import portpicker
import pytest

from helpers import subprocess_env
from lmos_jax.config.schema import base_config
from lmos_jax.parallel import distributed
from lmos_jax.parallel.distributed import DistributedError, resolve_cluster

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # hard cap per launch: CI can never hang on a stuck collective

TINY = """
from lmos_jax.config.schema import base_config

def get_config(arg=None):
  c = base_config()
  m, d, t = c.model, c.data, c.train
  m.num_layers, m.num_heads, m.d_model, m.max_seq_len = 1, 2, 32, 16
  d.seq_len, d.max_chars = 16, 20000
  # constant LR: the restart below changes train.steps, which a decaying schedule would see
  t.batch_size, t.steps, t.lr, t.schedule, t.warmup_steps = 8, 4, 1e-2, "constant", 0
  t.log_every, t.eval_every, t.ckpt_every, t.eval_batches = 1, 2, 2, 1
  t.sample_tokens, t.progress, t.precision = 0, False, "fp32"
  return c
"""


def _env(devices: int) -> dict:
  env = subprocess_env(devices)
  env["JAX_PLATFORMS"] = "cpu"
  env["TOKENIZERS_PARALLELISM"] = "false"
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID"):
    env.pop(k, None)
  return env


def _launch(args_per_process: list[list[str]], devices: int) -> list[subprocess.CompletedProcess]:
  """Starts all processes at once, waits with a hard timeout, kills every one on expiry."""
  procs = [subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for args in args_per_process]
  outs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=TIMEOUT_S)
      outs.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return outs


def _train_args(cfg_file: Path, workdir: Path, port: int, pid: int, steps: int) -> list[str]:
  return ["-m", "lmos_jax.cli", "train", f"--config={cfg_file}", f"--workdir={workdir}",
          f"--config.train.steps={steps}",
          f"--config.distributed.coordinator_address=127.0.0.1:{port}",
          "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}",
          "--config.distributed.timeout_s=120"]


def _rows(workdir: Path) -> dict[int, dict]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r for r in map(json.loads, lines)}


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_match_single_process(tmp_path):
  cfg_file = tmp_path / "tiny.py"
  cfg_file.write_text(TINY)
  ref_dir, mh_dir = tmp_path / "single", tmp_path / "multi"

  # reference: this (single) process, holding all 8 devices of the same global mesh (data=8)
  from lmos_jax.config.loading import load_config_file
  from lmos_jax.train.trainer import train
  train(load_config_file(str(cfg_file)), ref_dir)

  # two processes x 4 devices: steps 1-2, checkpoint at 2, exit; restart both; steps 3-4
  for steps in (2, 4):
    port = portpicker.pick_unused_port()
    outs = _launch([_train_args(cfg_file, mh_dir, port, pid, steps) for pid in (0, 1)],
                   devices=4)
    for pid, o in enumerate(outs):
      assert o.returncode == 0, f"process {pid}:\n{o.stdout[-3000:]}"
    assert "mesh {'data': 8" in outs[0].stdout  # one global mesh over both processes
    assert ("resuming at step 2" in outs[0].stdout) == (steps == 4)
    assert "lmos train:" not in outs[1].stdout  # only process 0 logs

  ref, mh = _rows(ref_dir), _rows(mh_dir)
  assert sorted(mh) == sorted(ref) == [1, 2, 3, 4]
  loss_ref = np.array([ref[s]["loss"] for s in range(1, 5)])
  loss_mh = np.array([mh[s]["loss"] for s in range(1, 5)])
  # cross-process (gloo) and in-process all-reduces may sum in a different order: f32 noise only
  # (~1e-6 relative, carried through 4 Adam steps); losses are ~4, so rtol 1e-5 (~80 eps) is
  # the bound and atol 1e-6 never binds
  np.testing.assert_allclose(loss_mh, loss_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([mh[s]["eval_loss"] for s in (2, 4)],
                             [ref[s]["eval_loss"] for s in (2, 4)], rtol=1e-5, atol=1e-6)
  assert loss_ref[3] < loss_ref[0]  # it trained
  print("\nstep  single-process  two-process  |diff|")
  for s in range(4):
    print(f"{s + 1:>4}  {loss_ref[s]:.7f}  {loss_mh[s]:.7f}  {abs(loss_ref[s] - loss_mh[s]):.2e}")
  # only process 0 wrote logs; both wrote their part of the checkpoint (orbax names per-process
  # files process_N) and orbax committed it after all hosts finished
  step_dir = mh_dir / "checkpoints" / "4"
  assert (mh_dir / "metrics.jsonl").exists() and step_dir.is_dir()
  for pid in (0, 1):
    assert any(f"process_{pid}" in q.name for q in step_dir.rglob("*")), pid


CHECK = """
import sys
import jax
from lmos_jax.config.schema import base_config
from lmos_jax.parallel import distributed
pid, port, lr = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
c = base_config()
c.train.lr = lr
d = c.distributed
d.coordinator_address, d.num_processes, d.process_id = f"127.0.0.1:{port}", 2, pid
d.timeout_s = int(sys.argv[4])
distributed.initialize(d)
try:
  distributed.check_same_config(c)
  print("configs agree")
except distributed.DistributedError as e:
  print(f"DistributedError: {e}")
"""


def _check(pids_lrs: list[tuple[int, float]], port: int, timeout_s: int = 60):
  return _launch([["-c", CHECK, str(pid), str(port), str(lr), str(timeout_s)]
                  for pid, lr in pids_lrs], devices=2)


def test_processes_with_different_configs_fail_clearly_on_every_process():
  outs = _check([(0, 3e-3), (1, 1e-3)], portpicker.pick_unused_port())
  for o in outs:
    assert o.returncode == 0, o.stdout[-2000:]
    assert "DistributedError: processes disagree: process 1 differs from process 0 in train" in o.stdout


def test_missing_process_ends_with_a_clear_message_after_the_timeout():
  # process 0 waits for a process 1 that never starts
  (o,) = _check([(0, 3e-3)], portpicker.pick_unused_port(), timeout_s=3)
  assert o.returncode == distributed.EXIT_JOIN_TIMEOUT, o.stdout[-2000:]
  assert "not all processes joined within distributed.timeout_s=3 s" in o.stdout
  assert "process 0 of 2" in o.stdout


def test_unreachable_coordinator_is_a_python_error():
  d = base_config().distributed
  d.coordinator_address = f"127.0.0.1:{portpicker.pick_unused_port()}"  # nobody listens
  d.num_processes, d.process_id, d.timeout_s = 2, 1, 1
  with pytest.raises(DistributedError, match="unreachable for 1 s"):
    distributed.initialize(d)


def _dcfg(**kw):
  d = base_config().distributed
  for k, v in kw.items():
    d[k] = v
  return d


def test_resolve_cluster_sources():
  assert resolve_cluster(_dcfg(), {}, on_tpu_vm=False) is None  # plain single process
  assert resolve_cluster(_dcfg(enabled="off"), {"JAX_NUM_PROCESSES": "2"}) is None
  spec = resolve_cluster(_dcfg(coordinator_address="10.0.0.1:1234", num_processes=4,
                               process_id=3, local_device_ids="0,1"), {}, on_tpu_vm=False)
  assert (spec.coordinator_address, spec.num_processes, spec.process_id, spec.source,
          spec.local_device_ids) == ("10.0.0.1:1234", 4, 3, "config", (0, 1))
  env = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  spec = resolve_cluster(_dcfg(), env, on_tpu_vm=False)
  assert (spec.coordinator_address, spec.num_processes, spec.process_id, spec.source) == (
      "h:9", 2, 1, "env")
  slurm = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8", "SLURM_PROCID": "5"}
  spec = resolve_cluster(_dcfg(), slurm, on_tpu_vm=False)
  assert (spec.coordinator_address, spec.num_processes, spec.process_id, spec.source) == (
      None, 8, 5, "slurm")  # jax derives the coordinator from SLURM_STEP_NODELIST
  assert resolve_cluster(_dcfg(), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"},
                         on_tpu_vm=False) is None  # a one-task allocation is single-process
  assert resolve_cluster(_dcfg(), {}, on_tpu_vm=True).source == "tpu"
  assert resolve_cluster(_dcfg(enabled="on"), {}, on_tpu_vm=False).source == "auto"


@pytest.mark.parametrize("kw,env,match", [
    (dict(coordinator_address="h:1"), {}, "distributed.num_processes, distributed.process_id"),
    (dict(coordinator_address="nohost", num_processes=2, process_id=0), {}, "host:port"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), {}, r"\[0, num_processes"),
    (dict(enabled="yes"), {}, "expected auto, on or off"),
    (dict(), {"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two'"),
    (dict(local_device_ids="0;1", coordinator_address="h:1", num_processes=2, process_id=0),
     {}, "comma-separated"),
])
def test_resolve_cluster_errors_name_the_field(kw, env, match):
  with pytest.raises(DistributedError, match=match):
    resolve_cluster(_dcfg(**kw), env, on_tpu_vm=False)


def test_fingerprint_names_differing_blocks_and_ignores_process_fields():
  a, b = base_config(), base_config()
  b.distributed.process_id, b.distributed.local_device_ids = 1, "4,5"
  assert distributed.config_fingerprint(a) == distributed.config_fingerprint(b)
  b.model.d_model = 256
  b.mesh.fsdp = 2
  fa, fb = distributed.config_fingerprint(a), distributed.config_fingerprint(b)
  names = list(fa)
  table = np.array([[fa[n] for n in names], [fa[n] for n in names], [fb[n] for n in names]])
  msg = distributed.compare_fingerprints(names, table)
  assert "process 2 differs from process 0 in mesh, model." in msg and "process 1" not in msg
  assert distributed.compare_fingerprints(names, table[:2]) is None


def test_busy_coordinator_port_is_named_before_jax_binds_it():
  import socket
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("", 0))
    s.listen(1)
    port = s.getsockname()[1]
    with pytest.raises(DistributedError, match=f"coordinator port {port} on process 0 is busy"):
      distributed.check_port_free(f"127.0.0.1:{port}")
