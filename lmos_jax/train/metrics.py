"""Model FLOPs, device peaks and MFU, plus the run's metric writers (JSONL + TensorBoard)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lmos_jax.models.layers import TransformerConfig

# Dense bf16 peak FLOP/s per chip, by substrings of `device.device_kind`.
PEAK_FLOPS = (
    ("h200", 989e12), ("h100", 989e12), ("gh200", 989e12), ("a100", 312e12),
    ("l40s", 362e12), ("l4", 121e12), ("a10", 125e12), ("v100", 125e12), ("t4", 65e12),
    ("b200", 2250e12), ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12), ("tpu v4", 275e12), ("tpu v3", 123e12), ("tpu v2", 45e12),
)


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


def measure_cpu_peak(n: int = 1024, iters: int = 4, repeats: int = 3) -> float:
  """Host f32 matmul FLOP/s, measured once by a short probe (CPU has no spec sheet here).

  Best of `repeats` rounds, so a moment of contention from other processes lowers it less.
  """
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
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


def device_peak_flops(devices=None) -> tuple[float, str]:
  """Total peak FLOP/s of the devices and where the number came from."""
  devices = jax.devices() if devices is None else devices
  kind = devices[0].device_kind.lower()
  if devices[0].platform == "cpu":
    # 2048^2, not the 1024^2 default: a short probe is easily slowed by start-up work at the
    # beginning of a run, and a low peak inflates the logged MFU.
    return measure_cpu_peak(n=2048), "measured f32 matmul probe (whole host)"
  for key, peak in PEAK_FLOPS:
    if key in kind:
      return peak * len(devices), f"spec sheet bf16 peak for {kind} x{len(devices)}"
  return float("nan"), f"unknown device kind {kind!r}: MFU not computed"


class MetricWriter:
  """Appends one JSON object per log step to metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: Path, enabled: bool = True):
    self.enabled = enabled
    self.path = workdir / "metrics.jsonl"
    self.tb = None
    if enabled:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(workdir / "tb"))

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step":
        self.tb.add_scalar(k, v, int(step))
    self.tb.flush()

  def write_text(self, tag: str, text: str, step: int) -> None:
    if self.enabled:
      self.tb.add_text(tag, text, int(step))
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
