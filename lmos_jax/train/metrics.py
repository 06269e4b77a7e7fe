"""Model FLOPs, device peaks and MFU, plus the run's metric writers (JSONL + TensorBoard)."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
import time
import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lmos_jax.models.layers import TransformerConfig
from lmos_jax.parallel.host_cpu import cpu_model

@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator's spec-sheet figures: the MFU denominator and what `lmos plan`'s
  memory and step-time models need."""

  name: str
  kinds: tuple[str, ...]  # substrings of `device.device_kind` (lower case) naming this chip
  bf16_flops: float  # dense peak FLOP/s (fp16 on chips without bf16)
  f32_flops: float
  memory: float  # bytes of device memory
  link_bw: float | None  # bytes/s per device for collectives (one direction); None: unknown


# The one table of chips. Spec-sheet figures, dense (no sparsity). f32 on GPUs since Ampere is
# the TF32 tensor-core rate that JAX's default matmul precision uses; TPUs run f32 matmuls as
# bf16 passes (~1/3 rate). GPUs without NVLink use the PCIe x16 rate.
CHIPS = types.MappingProxyType({c.name: c for c in (
    Chip("b200", ("b200",), 2250e12, 1100e12, 180e9, 900e9),
    Chip("gh200", ("gh200",), 989e12, 494e12, 96e9, 450e9),
    Chip("h200", ("h200",), 989e12, 494e12, 141e9, 450e9),
    Chip("h100", ("h100",), 989e12, 494e12, 80e9, 450e9),
    Chip("a100", ("a100",), 312e12, 156e12, 80e9, 300e9),
    Chip("l40s", ("l40s",), 362e12, 183e12, 48e9, 32e9),
    Chip("l4", ("l4",), 121e12, 60e12, 24e9, 32e9),
    Chip("a10", ("a10",), 125e12, 62.5e12, 24e9, 32e9),
    Chip("v100", ("v100",), 125e12, 15.7e12, 32e9, 150e9),
    Chip("t4", ("t4",), 65e12, 8.1e12, 16e9, 16e9),
    Chip("tpu-v6e", ("tpu v6",), 918e12, 306e12, 32e9, 400e9),
    Chip("tpu-v5p", ("tpu v5p",), 459e12, 153e12, 95e9, 600e9),
    Chip("tpu-v5e", ("tpu v5 lite", "tpu v5e"), 197e12, 66e12, 16e9, 200e9),
    Chip("tpu-v4", ("tpu v4",), 275e12, 92e12, 32e9, 300e9),
    Chip("tpu-v3", ("tpu v3",), 123e12, 41e12, 32e9, 330e9),
    Chip("tpu-v2", ("tpu v2",), 45e12, 15e12, 16e9, None),
)})


def chip_of(device_kind: str) -> Chip | None:
  """The table's chip for a `device.device_kind`: the longest matching substring wins, so
  'gh200' is not read as 'h200' nor 'l40s' as 'l4'."""
  kind = device_kind.lower()
  hits = [(len(k), c) for c in CHIPS.values() for k in c.kinds if k in kind]
  return max(hits, key=lambda h: h[0])[1] if hits else None


def flops_per_token(cfg: TransformerConfig, seq_len: int, lm_head: bool = True) -> float:
  """Training FLOPs per token: 6 x matmul params + attention (PaLM appendix B convention).

  `lm_head=False` for sequence classification, where no token goes through the vocab head.
  """
  d, f, l = cfg.d_model, cfg.d_ff, cfg.num_layers
  qkv = d * cfg.head_dim * (cfg.num_heads + 2 * cfg.kv_heads)
  out = cfg.num_heads * cfg.head_dim * d
  mlp = d * f * (3 if cfg.mlp == "swiglu" else 2)
  head = d * cfg.vocab_size if lm_head else 0
  matmul_params = l * (qkv + out + mlp) + head
  attention = 12 * l * cfg.num_heads * cfg.head_dim * seq_len
  return 6.0 * matmul_params + attention


def measure_cpu_peak(n: int = 1024, iters: int = 4, repeats: int = 3,
                     bf16: bool = False) -> float:
  """Host matmul FLOP/s, measured once by a short probe (CPU has no spec sheet here): f32,
  or (`bf16`) bf16 operands with float32 accumulation, the matmuls of the bf16 policies.

  Best of `repeats` rounds, so a moment of contention from other processes lowers it less.
  """
  a = jnp.ones((n, n), jnp.bfloat16 if bf16 else jnp.float32)
  f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  best = 0.0
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = f(a)
    out.block_until_ready()
    best = max(best, 2.0 * n ** 3 * iters / (time.perf_counter() - t0))
  return best


def median_step_seconds(step_fn, state, batch, steps: int, repeats: int):
  """Median seconds per call of an already-compiled `step_fn(state, batch) -> (state, _)`.

  Returns the final state too, since the step donates it.
  """
  import statistics
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, _ = step_fn(state, batch)
    jax.block_until_ready(state)
    times.append((time.perf_counter() - t0) / steps)
  return state, statistics.median(times)


PEAK_FILE = "lmos_host_peak.json"  # in the compile cache's directory, beside the programs


def read_machine_file(path: Path) -> dict:
  """A per-machine measurement file ({host key: entry}); {} when absent or unreadable."""
  try:
    known = json.loads(path.read_text())
  except (OSError, ValueError):
    return {}
  return known if isinstance(known, dict) else {}


def write_machine_entry(path: Path, key: str, entry: dict) -> None:
  """Merges `entry` under `key` (other machines' entries stay). Several processes may write
  at once: each writes a whole file and the last rename wins. An unwritable place is not an
  error: it only means measuring again next time."""
  import os
  known = read_machine_file(path)
  known[key] = entry
  tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
    os.replace(tmp, path)
  except OSError:
    pass


def host_key(devices) -> str:
  """What a measured host peak depends on: CPU model, cores this process may use, the XLA
  CPU devices it splits them into, jax's version and the XLA flags."""
  import os
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  cpu = cpu_model() or platform.processor() or "unknown"
  return (f"{cpu} | {cores} cores | {len(devices)} devices | jax {jax.__version__} | "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '').strip()}")


def cached_cpu_peak(devices, cache_dir: str | None, bf16: bool = False) -> tuple[float, str]:
  """The host's matmul peak in the run's matmul dtype: measured once per machine, then read
  back.

  The probe costs ~1.4 s of every run's start-up on 2 cores, and repeated probes differ only
  by the load of the moment. The value is kept in the persistent compile cache's directory
  (off with the compile cache), keyed by `host_key`, so another machine, core count, device
  split, jax version or XLA flag set measures afresh; the log line says which it was. A CPU
  with bf16 dot instructions multiplies bf16 faster than f32: a bf16 run's MFU against the
  f32 peak read near or above 1, so each dtype has its own peak.
  """
  # 2048^2, not the 1024^2 default: a short probe is easily slowed by start-up work at the
  # beginning of a run, and a low peak inflates the logged MFU.
  what = f"{'bf16' if bf16 else 'f32'} matmul probe (whole host)"
  if not cache_dir:
    return measure_cpu_peak(n=2048, bf16=bf16), f"measured {what}"
  path, key = Path(cache_dir) / PEAK_FILE, host_key(devices)
  field, when = ("flops bf16", "when bf16") if bf16 else ("flops", "when")
  entry = read_machine_file(path).get(key)
  entry = entry if isinstance(entry, dict) else {}
  if isinstance(entry.get(field), (int, float)):
    return float(entry[field]), f"{what} measured {entry.get(when)}, read from {path}"
  peak = measure_cpu_peak(n=2048, bf16=bf16)
  write_machine_entry(path, key, {**entry, field: peak, when: time.strftime("%Y-%m-%d %H:%M")})
  return peak, f"measured {what}, kept in {path}"


def device_peak_flops(devices=None, cache_dir: str | None = None,
                      bf16: bool = False) -> tuple[float, str]:
  """Total peak FLOP/s of the devices and where the number came from. On CPU, a measured
  probe in the run's matmul dtype (`bf16`: the bf16 policies), cached per machine in
  `cache_dir` (the compile cache's directory) when given; elsewhere the spec sheet's bf16
  peak, the usual reference for MFU."""
  devices = jax.devices() if devices is None else devices
  kind = devices[0].device_kind.lower()
  if devices[0].platform == "cpu":
    return cached_cpu_peak(devices, cache_dir, bf16)
  chip = chip_of(kind)
  if chip is not None:
    return chip.bf16_flops * len(devices), f"spec sheet bf16 peak for {kind} x{len(devices)}"
  return float("nan"), f"unknown device kind {kind!r}: MFU not computed"


def summary_writer_class():
  """tensorboardX's SummaryWriter, imported without loading torch or boto3.

  Its writer module imports torch whenever torch is installed, only to accept torch tensors
  as values (about 1.4 s of every run's start-up on a 2-core host), and boto3 whenever boto3
  is installed, only for s3:// log directories (about 0.07 s); lmos gives it floats and
  strings and a local directory. So each of them not already loaded is marked absent during
  the import (`sys.modules[name] = None` makes `import name` raise ImportError, which
  tensorboardX handles), and the marks are removed right after.
  """
  masked = [name for name in ("torch", "boto3") if name not in sys.modules]
  for name in masked:
    sys.modules[name] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter
  finally:
    for name in masked:
      del sys.modules[name]
  return SummaryWriter


class MetricWriter:
  """Appends one JSON object per log step to metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: Path, enabled: bool = True):
    self.enabled = enabled
    self.path = workdir / "metrics.jsonl"
    self.tb = None
    if enabled:
      self.tb = summary_writer_class()(str(workdir / "tb"))

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    # NaN (the first fetch's rates: no interval measured yet) stays in the JSONL only, since
    # tensorboardX logs a warning for every NaN it is given
    for k, v in row.items():
      if k != "step" and math.isfinite(v):
        self.tb.add_scalar(k, v, int(step))
    self.tb.flush()

  def write_text(self, tag: str, text: str, step: int) -> None:
    if self.enabled:
      self.tb.add_text(tag, text, int(step))
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
