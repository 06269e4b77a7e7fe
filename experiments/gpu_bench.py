"""GPT-2 124M training throughput on whatever accelerator is present: tokens/s, MFU, memory.

Runs the real lmos train step (configs/gpt2_124m.py: 12L/12H/768d, block 1024, vocab
50304, AdamW, bf16 compute with f32 master weights, fsdp over all devices) on synthetic
token batches already on the devices, so the input pipeline is not what is measured.
MFU = model FLOPs (6 x matmul params + attention, PaLM convention) x tokens/s / spec-sheet
bf16 peak. Finishes in well under 5 minutes on a GPU (compile ~1 min, `--seconds` of steps).
On a CPU it runs a tiny smoke setting (2L/128d, vocab 512, block 128, fp32) unless --full.

  python3 experiments/gpu_bench.py                     # H200: batch 16/device, cudnn attention
  python3 experiments/gpu_bench.py --batch 32 --remat dots_no_batch
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from lmos_jax.config.loading import load_config_file, validate
from lmos_jax.train import plan as planner
from lmos_jax.parallel.sharding import batch_sharding
from lmos_jax.train.metrics import device_peak_flops

ROOT = Path(__file__).resolve().parents[1]


def bench_config(args, platform: str, n: int):
  cfg = load_config_file(str(ROOT / "configs" / "gpt2_124m.py"))
  tiny = platform == "cpu" and not args.full
  m, t = cfg.model, cfg.train
  if tiny:
    m.num_layers, m.num_heads, m.d_model, m.vocab_size = 2, 4, 128, 512
    m.max_seq_len = cfg.data.seq_len = 128
  else:
    cfg.data.seq_len = args.seq
  per_device = args.batch or (4 if tiny else 16)
  t.batch_size, t.microbatches = per_device * n, 1
  t.precision = "auto" if tiny else args.precision
  m.remat = args.remat
  m.attention_impl = args.attention or ("cudnn" if platform == "gpu" else "xla")
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
  validate(cfg, n)
  return cfg, tiny


def device_memory_peak(devices) -> float | None:
  stats = [d.memory_stats() for d in devices]
  peaks = [s.get("peak_bytes_in_use") for s in stats if s]
  return max(peaks) if peaks else None


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=0, help="sequences per device")
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--remat", default="none", choices=planner.REMAT_CHOICES)
  ap.add_argument("--attention", default="", help="auto | xla | cudnn (default cudnn on GPU)")
  ap.add_argument("--precision", default="bf16", help="bf16 | bf16_full | fp32")
  ap.add_argument("--seconds", type=float, default=60.0, help="time spent in timed steps")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--full", action="store_true", help="the real 124M model even on CPU")
  args = ap.parse_args(argv)
  devices = jax.devices()
  platform, n = devices[0].platform, len(devices)
  cfg, tiny = bench_config(args, platform, n)
  print(f"jax {jax.__version__}, {n} x {devices[0].device_kind} ({platform}); "
        f"{'TINY CPU SMOKE SETTING' if tiny else 'GPT-2 124M'}; load {os.getloadavg()}",
        flush=True)
  vocab = cfg.model.vocab_size
  b = planner.build_step(cfg, vocab, devices)
  t0 = time.perf_counter()
  compiled = b.compile()
  compile_s = time.perf_counter() - t0
  with jax.set_mesh(b.mesh):
    state = jax.jit(b.init_fn, out_shardings=b.shardings)(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  sh = batch_sharding(b.mesh, 2)
  batches = []
  for _ in range(4):  # distinct batches, already on the devices (prefetched)
    tok = rng.integers(0, vocab, (cfg.train.batch_size, cfg.data.seq_len + 1), dtype=np.int32)
    batches.append({"inputs": jax.device_put(tok[:, :-1], sh),
                    "targets": jax.device_put(tok[:, 1:], sh)})
  for i in range(args.warmup):
    state, metrics = compiled(state, batches[i % 4])
  jax.block_until_ready(state)
  steps, t0 = 0, time.perf_counter()
  while True:
    state, metrics = compiled(state, batches[steps % 4])
    steps += 1
    if steps % 5 == 0:
      jax.block_until_ready(metrics)
      if time.perf_counter() - t0 > args.seconds:
        break
  jax.block_until_ready(state)
  wall = time.perf_counter() - t0
  tcfg = planner.model_shape(cfg, vocab, platform)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  tok_s = steps * tokens / wall
  peak, src = device_peak_flops(devices)
  mfu = tcfg.flops_per_token * tok_s / peak
  peak_mem = device_memory_peak(devices)
  compiled_mem = planner.compiled_memory(compiled)
  row = {"device": devices[0].device_kind, "devices": n, "params_M": tcfg.params / 1e6,
         "batch": cfg.train.batch_size, "seq": cfg.data.seq_len, "remat": cfg.model.remat,
         "attention": cfg.model.attention_impl, "precision": cfg.train.precision,
         "compile_s": compile_s, "steps": steps, "step_ms": 1e3 * wall / steps,
         "tokens_per_s": tok_s, "mfu": mfu, "peak_source": src,
         "compiled_mem_GiB": compiled_mem / 2 ** 30,
         "peak_mem_GiB": None if peak_mem is None else peak_mem / 2 ** 30,
         "loss": float(jax.device_get(metrics["loss"]))}
  print("| device | params | batch x seq | remat | attention | compile s | step ms | "
        "tokens/s | MFU | mem GiB/device (peak / compiled) |\n|" + "---|" * 10)
  print(f"| {n} x {row['device']} | {row['params_M']:.1f}M | {row['batch']} x {row['seq']} | "
        f"{row['remat']} | {row['attention']} | {compile_s:.1f} | {row['step_ms']:.1f} | "
        f"{tok_s:,.0f} | {100 * mfu:.1f}% | "
        f"{'n/a' if peak_mem is None else f'{peak_mem / 2 ** 30:.2f}'} / "
        f"{compiled_mem / 2 ** 30:.2f} |")
  print(json.dumps(row))
  return 0


if __name__ == "__main__":
  sys.exit(main())
