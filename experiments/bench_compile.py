"""Compile time and step time against depth (2, 4, 8, 16 layers), scan vs unrolled layers.

Scan compiles one layer body whatever the depth; unrolled compiles every layer, which costs
compile time but lets XLA fuse and schedule across layers. Width follows nanoGPT's CPU
shape (128d, block 64, batch 12) unless flags say otherwise; one CPU device.

  python3 experiments/bench_compile.py
  python3 experiments/bench_compile.py --depths 2,4 --d-model 384 --seq 256 --batch 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from lmos_jax.config.schema import base_config
from lmos_jax.train import plan as planner
from lmos_jax.train.metrics import median_step_seconds


def run(depth: int, scan: bool, args) -> tuple[float, float]:
  """(seconds to lower + compile, median seconds per step)."""
  c = base_config()
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.max_seq_len = depth, args.d_model, 4, args.seq
  m.scan_layers = scan
  c.data.seq_len, c.train.batch_size, c.train.precision = args.seq, args.batch, "fp32"
  c.mesh.data = 1
  b = planner.build_step(c, 256, jax.devices()[:1])
  t0 = time.perf_counter()
  compiled = b.compile()
  compile_s = time.perf_counter() - t0
  with jax.set_mesh(b.mesh):
    state = jax.jit(b.init_fn, out_shardings=b.shardings)(jax.random.PRNGKey(0))
  tok = np.random.default_rng(0).integers(0, 256, (args.batch, args.seq), dtype=np.int32)
  batch = {"inputs": tok, "targets": np.roll(tok, -1, axis=1)}
  state, _ = compiled(state, batch)
  _, step_s = median_step_seconds(compiled, state, batch, args.steps, args.repeats)
  return compile_s, step_s


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--depths", default="2,4,8,16")
  ap.add_argument("--d-model", type=int, default=128)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--batch", type=int, default=12)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.d_model}d, batch "
        f"{args.batch} x {args.seq}; load {os.getloadavg()}")
  print("| layers | scan compile s | unrolled compile s | scan step ms | unrolled step ms | "
        "unrolled/scan step |\n|---|---|---|---|---|---|")
  for depth in (int(d) for d in args.depths.split(",")):
    sc, ss = run(depth, True, args)
    uc, us = run(depth, False, args)
    print(f"| {depth} | {sc:.2f} | {uc:.2f} | {1e3 * ss:.1f} | {1e3 * us:.1f} | "
          f"{us / ss:.2f} |", flush=True)
  print(f"load at end {os.getloadavg()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
