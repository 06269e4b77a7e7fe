"""The CPU host: what its CPU is, and how many XLA devices JAX shows on it.

What it is comes from Linux's /proc/cpuinfo: its model (the key of a measured peak), its
first block (what -march=native compiles for) and whether it multiplies bf16 in hardware
(what `train.precision=auto` decides on). Elsewhere every answer is empty and callers fall
back to `platform`. The device count is set before JAX's backend starts (`split_cpu_host`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


def cpuinfo() -> str:
  """This host's /proc/cpuinfo ('' where there is none: macOS, Windows)."""
  try:
    return Path("/proc/cpuinfo").read_text()
  except OSError:
    return ""


def _first_cpu(text: str) -> dict[str, str]:
  """The first processor's `key: value` lines."""
  fields: dict[str, str] = {}
  for line in text.split("\n\n")[0].splitlines():
    key, sep, value = line.partition(":")
    if sep:
      fields.setdefault(key.strip(), value.strip())
  return fields


def cpu_model(text: str | None = None) -> str:
  """The CPU's model name ('' when not known)."""
  return _first_cpu(cpuinfo() if text is None else text).get("model name", "")


def cpu_identity(text: str | None = None) -> str:
  """The model name and the feature flags: what code built for this CPU depends on."""
  fields = _first_cpu(cpuinfo() if text is None else text)
  return "\n".join(f"{k}: {fields[k]}" for k in ("model name", "flags") if k in fields)


def bf16_dot_flags(text: str | None = None) -> list[str]:
  """The bf16 dot-product instruction sets among the CPU's flags (x86: AVX512-BF16, AMX-BF16),
  in the order checked."""
  have = set(_first_cpu(cpuinfo() if text is None else text).get("flags", "").split())
  return [f for f in ("avx512_bf16", "amx_bf16") if f in have]


def cpu_device_count(mesh_cfg: Any, batch_size: int, microbatches: int, cores: int) -> int:
  """How many XLA devices a CPU-only host should show; see `split_cpu_host`."""
  if mesh_cfg.cpu_devices > 0:
    return int(mesh_cfg.cpu_devices)
  if mesh_cfg.data != -1 or mesh_cfg.fsdp != 1 or mesh_cfg.tensor != 1:
    return 1  # an explicit layout was asked for: don't change the device count under it
  per_micro = max(batch_size // max(microbatches, 1), 1)
  return max(n for n in range(1, max(cores, 1) + 1) if per_micro % n == 0)


def split_cpu_host(mesh_cfg: Any, batch_size: int, microbatches: int,
                   cores: int | None = None) -> int | None:
  """Shows a CPU-only host to JAX as one device per core, before the backend starts.

  Data parallelism over per-core devices runs each op on one core, with no intra-op
  hand-offs between threads, which is faster for small models than one multi-threaded
  device (experiments/bench_train.py measures it). `mesh.cpu_devices`: 0 = auto (the
  most devices, up to the core count, that split each microbatch evenly; only under the
  default all-data mesh), N = exactly N. Accelerator hosts are unaffected (only the CPU
  platform's device count changes). Returns the count set, or None when it was left alone:
  XLA_FLAGS already fixes a count, or JAX's backend was already started (a notebook that ran
  JAX first keeps its devices; a note says so).
  """
  import jax
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return None
  cores = cores or len(os.sched_getaffinity(0))
  n = cpu_device_count(mesh_cfg, batch_size, microbatches, cores)
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:
    if n != len(jax.devices("cpu")):
      print(f"lmos: JAX already started with {len(jax.devices('cpu'))} CPU device(s); "
            f"{n} would use this host's {cores} cores better (start a fresh process, or set "
            "mesh.cpu_devices to the current count to silence this)", file=sys.stderr)
    return None
  return n


def split_cpu_host_for(cfg: Any) -> int | None:
  """`mesh.cpu_devices` checked, then `split_cpu_host` for the run `cfg` describes: what
  `lmos train` and `lmos plan` do before JAX starts."""
  from lmos_jax.config.loading import check_cpu_devices
  check_cpu_devices(cfg)
  return split_cpu_host(cfg.mesh, cfg.train.batch_size, cfg.train.microbatches)
