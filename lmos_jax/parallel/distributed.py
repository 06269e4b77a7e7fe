"""Multi-host start-up: `jax.distributed.initialize` from the config or the environment.

JAX's multi-controller runtime does the real work: every host runs the same program, process 0
also hosts the coordination service, and collectives then span all hosts' devices. This module
only decides *whether* and *how* to call it, and turns the ways a start can go wrong into
clear errors:
- coordinator unreachable: non-coordinators probe the address before joining (Python error);
- a process missing: a watchdog ends the process with a message after `distributed.timeout_s`
  (jax itself would abort with an opaque DEADLINE_EXCEEDED from C++, which Python cannot catch);
- processes disagree: a fingerprint of the config is all-gathered and compared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Mapping

import numpy as np

EXIT_JOIN_TIMEOUT = 75  # exit status when not every process joined in time (EX_TEMPFAIL)
_GRACE_S = 30  # jax's own join timeout is longer than ours, so our message always wins
_FINGERPRINT_SKIP = ("distributed",)  # per-process by nature (process_id, local devices)


class DistributedError(RuntimeError):
  """A multi-host start failed; the message says which process, what, and the fix."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
  """How this process joins the cluster. None fields are left to jax's auto-detection."""

  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  local_device_ids: tuple[int, ...] | None
  source: str  # config | env | slurm | openmpi | tpu | auto
  timeout_s: int
  heartbeat_timeout_s: int

  def describe(self) -> str:
    who = "?" if self.process_id is None else self.process_id
    n = "?" if self.num_processes is None else self.num_processes
    addr = self.coordinator_address or "chosen by jax"
    return f"process {who} of {n}, coordinator {addr} (from {self.source})"


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
  raw = environ.get(name, "").strip()
  if not raw:
    return None
  try:
    return int(raw)
  except ValueError:
    raise DistributedError(f"environment {name}={raw!r} must be an integer") from None


def _device_ids(raw: str, field: str) -> tuple[int, ...] | None:
  raw = raw.strip()
  if not raw:
    return None
  try:
    return tuple(int(x) for x in raw.split(","))
  except ValueError:
    raise DistributedError(f"{field}={raw!r}: expected comma-separated device ids like "
                           "'0,1,2,3'") from None


def _on_tpu_vm() -> bool:
  """A Cloud TPU VM without asking the metadata server: TPU device files plus libtpu, and
  jax not restricted to other platforms (tests on a TPU VM with JAX_PLATFORMS=cpu stay local)."""
  import importlib.util

  import jax
  platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms.split(","):
    return False
  has_chip = os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")
  return has_chip and importlib.util.find_spec("libtpu") is not None


def resolve_cluster(dcfg: Any, environ: Mapping[str, str] | None = None,
                    on_tpu_vm: bool | None = None) -> ClusterSpec | None:
  """The cluster this process belongs to, or None for a plain single-process run.

  Precedence: config fields, then JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID, then SLURM / Open MPI variables and Cloud TPU VMs (detected by jax).
  """
  environ = os.environ if environ is None else environ
  mode = dcfg.enabled
  if mode not in ("auto", "on", "off"):
    raise DistributedError(f"config 'distributed.enabled'={mode!r}: expected auto, on or off")
  if mode == "off":
    return None
  timeout = int(dcfg.timeout_s)
  if timeout <= 0:
    raise DistributedError(f"config 'distributed.timeout_s'={timeout} must be positive")
  addr = dcfg.coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS", "") or None
  n = dcfg.num_processes if dcfg.num_processes >= 0 else _int_env(environ, "JAX_NUM_PROCESSES")
  pid = dcfg.process_id if dcfg.process_id >= 0 else _int_env(environ, "JAX_PROCESS_ID")
  local = (_device_ids(dcfg.local_device_ids, "config 'distributed.local_device_ids'")
           or _device_ids(environ.get("JAX_LOCAL_DEVICE_IDS", ""), "JAX_LOCAL_DEVICE_IDS"))
  common = dict(local_device_ids=local, timeout_s=timeout,
                heartbeat_timeout_s=int(dcfg.heartbeat_timeout_s))

  if addr or n is not None or pid is not None:
    source = "config" if (dcfg.coordinator_address or dcfg.num_processes >= 0
                          or dcfg.process_id >= 0) else "env"
    missing = [name for name, v in (("coordinator_address", addr), ("num_processes", n),
                                    ("process_id", pid)) if v is None]
    if missing:
      raise DistributedError(
          f"multi-host settings are incomplete: {', '.join('distributed.' + m for m in missing)}"
          " not set (nor JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID); give all "
          "three, e.g. --config.distributed.coordinator_address=10.0.0.1:8476 "
          "--config.distributed.num_processes=2 --config.distributed.process_id=0")
    if ":" not in addr or not addr.rsplit(":", 1)[1].isdigit():
      raise DistributedError(f"distributed.coordinator_address={addr!r}: expected host:port, "
                             "e.g. 10.0.0.1:8476")
    if n < 1 or not 0 <= pid < n:
      raise DistributedError(f"distributed.process_id={pid} must be in [0, num_processes={n})")
    if n == 1 and mode == "auto":
      return None
    return ClusterSpec(addr, n, pid, source=source, **common)

  if "SLURM_JOB_ID" in environ and (_int_env(environ, "SLURM_NTASKS") or 1) > 1:
    return ClusterSpec(None, _int_env(environ, "SLURM_NTASKS"),
                       _int_env(environ, "SLURM_PROCID"), source="slurm", **common)
  if (_int_env(environ, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return ClusterSpec(None, _int_env(environ, "OMPI_COMM_WORLD_SIZE"),
                       _int_env(environ, "OMPI_COMM_WORLD_RANK"), source="openmpi", **common)
  if on_tpu_vm if on_tpu_vm is not None else _on_tpu_vm():
    return ClusterSpec(None, None, None, source="tpu", **common)
  if mode == "on":
    return ClusterSpec(None, None, None, source="auto", **common)
  return None


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Retries a TCP connect to host:port until it answers; raises naming the address if not."""
  host, port = address.rsplit(":", 1)
  host = host.strip("[]")
  deadline = time.monotonic() + timeout_s
  last = None
  while time.monotonic() < deadline:
    try:
      with socket.create_connection((host, int(port)), timeout=2.0):
        return
    except OSError as e:
      last = e
      time.sleep(0.25)
  raise DistributedError(
      f"coordinator {address} unreachable for {timeout_s:.0f} s ({last}); check that process 0 "
      "was started, that the address is process 0's host and a free port, and that this host "
      "can reach it (firewall, HTTP(S)_PROXY variables)")


def check_port_free(address: str) -> None:
  """Process 0 binds the coordinator port; a busy port would otherwise fail inside C++."""
  port = int(address.rsplit(":", 1)[1])
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", port))
    except OSError as e:
      raise DistributedError(f"coordinator port {port} on process 0 is busy ({e}); choose a "
                             "free port in distributed.coordinator_address") from None


def _join_watchdog(spec: ClusterSpec) -> threading.Timer:
  """Ends the process with a clear message if the join takes longer than the timeout."""

  def fire() -> None:
    sys.stderr.write(
        f"\nlmos: distributed start failed: not all processes joined within "
        f"distributed.timeout_s={spec.timeout_s} s ({spec.describe()}). A process is missing "
        "or was started with a different num_processes/coordinator_address; start every "
        "process with the same settings and a distinct process_id in [0, num_processes).\n")
    sys.stderr.flush()
    os._exit(EXIT_JOIN_TIMEOUT)

  timer = threading.Timer(spec.timeout_s, fire)
  timer.daemon = True
  return timer


def initialize(dcfg: Any, environ: Mapping[str, str] | None = None) -> ClusterSpec | None:
  """Joins the cluster the config/environment names; a no-op for single-process runs.

  Must run before anything touches jax devices. Idempotent: a second call (e.g. two runs in
  one notebook or test process) keeps the existing connection.
  """
  import jax

  spec = resolve_cluster(dcfg, environ)
  if spec is None:
    return None
  if jax.distributed.is_initialized():
    return spec
  # CPU hosts need a collectives backend for cross-process all-reduces (GPU/TPU ignore this).
  if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none", ""):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if spec.coordinator_address and spec.process_id == 0:
    check_port_free(spec.coordinator_address)
  elif spec.coordinator_address:
    wait_for_coordinator(spec.coordinator_address, spec.timeout_s)
  kwargs: dict[str, Any] = dict(initialization_timeout=spec.timeout_s + _GRACE_S,
                                heartbeat_timeout_seconds=spec.heartbeat_timeout_s)
  if spec.local_device_ids is not None:
    kwargs["local_device_ids"] = list(spec.local_device_ids)
  timer = _join_watchdog(spec)
  timer.start()
  try:
    jax.distributed.initialize(spec.coordinator_address, spec.num_processes, spec.process_id,
                               **kwargs)
  finally:
    timer.cancel()
  return spec


def config_fingerprint(cfg: Any) -> dict[str, int]:
  """31-bit hashes of each top-level config block (minus per-process fields) and versions."""
  import flax
  import jax

  import lmos_jax

  tree = json.loads(cfg.to_json())
  for key in _FINGERPRINT_SKIP:
    tree.pop(key, None)

  def h(obj: Any) -> int:
    blob = json.dumps(obj, sort_keys=True).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little") & 0x7FFFFFFF

  from lmos_jax.config.schema import base_config
  known = [k for k in base_config().keys() if k not in _FINGERPRINT_SKIP]
  out = {k: h(tree.get(k)) for k in known}
  out["other keys"] = h({k: v for k, v in tree.items() if k not in known})
  out["versions"] = h([jax.__version__, flax.__version__, lmos_jax.__version__])
  return out


def compare_fingerprints(names: list[str], table_PK: np.ndarray) -> str | None:
  """A message naming the processes and blocks that differ from process 0, or None."""
  diffs = []
  for p in range(1, table_PK.shape[0]):
    blocks = [n for n, a, b in zip(names, table_PK[0], table_PK[p]) if a != b]
    if blocks:
      diffs.append(f"process {p} differs from process 0 in {', '.join(blocks)}")
  if not diffs:
    return None
  return ("processes disagree: " + "; ".join(diffs) + ". Start every process with the same "
          "--config file, the same --config.* overrides and the same package versions")


def check_same_config(cfg: Any) -> None:
  """All-gathers the config fingerprint; raises the same DistributedError on every process."""
  import jax
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return
  fp = config_fingerprint(cfg)
  names = list(fp)
  mine = np.asarray([fp[n] for n in names], np.int32)
  table_PK = np.asarray(multihost_utils.process_allgather(mine))
  msg = compare_fingerprints(names, table_PK.reshape(jax.process_count(), len(names)))
  if msg:
    raise DistributedError(msg)


def host_params(tree: Any) -> Any:
  """Numpy copies of arrays that may be sharded across hosts. A collective: every process calls.

  `jax.device_get` only works on arrays this process fully holds; with fsdp/tensor sharding
  over several hosts each host holds a part, so the parts are all-gathered first.
  """
  import jax
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
