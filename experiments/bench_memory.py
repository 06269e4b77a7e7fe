"""Per-device memory of the compiled train step on 8 simulated CPU devices, per mesh, and
remat policies' memory against step time (one device).

Part 1 compiles (no allocation) the same step for data-only, fsdp, tensor and mixed meshes
and prints `memory_analysis()` per device: arguments (params + optimizer state + batch),
temporaries, and the total the planner uses; fsdp divides params + optimizer state by 8, and
data-only with the moments split over data (mesh.opt_state, ZeRO-1) divides the moments.
Part 2 compiles and runs the step under each remat policy and prints temp memory vs the
median step time.

  python3 experiments/bench_memory.py
  python3 experiments/bench_memory.py --layers 4 --d-model 512 --batch 32 --seq 128
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lmos_jax.config.schema import base_config  # noqa: E402
from lmos_jax.train import plan as planner  # noqa: E402
from lmos_jax.train.metrics import median_step_seconds  # noqa: E402

MiB = 1024 ** 2
# (name, (data, fsdp, tensor), mesh.opt_state); the first row is the baseline of the ratios
MESHES = (("data-only, moments replicated", (8, 1, 1), "replicated"),
          ("data-only, moments split (ZeRO-1)", (8, 1, 1), "sharded"),
          ("fsdp", (1, 8, 1), "auto"), ("tensor", (1, 1, 8), "auto"),
          ("mixed fsdp+tensor", (1, 4, 2), "auto"), ("mixed data+fsdp+tensor", (2, 2, 2), "auto"))


def config(args):
  c = base_config()
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.max_seq_len = args.layers, args.d_model, 8, args.seq
  c.data.seq_len, c.train.batch_size, c.train.precision = args.seq, args.batch, "fp32"
  return c


def mesh_table(args) -> None:
  cfg = config(args)
  s = planner.model_shape(cfg, 256, "cpu")
  target = planner.present_target(8, peak_flops=1e11)
  print(f"\n{s.params / 1e6:.2f}M params ({s.params * 16 / MiB:.1f} MiB of f32 params + grads"
        f" + Adam moments); batch {args.batch} x {args.seq}; 8 simulated devices")
  print("| mesh | data,fsdp,tensor | args MiB | temp MiB | total MiB/device | analytic MiB |"
        " state / data-only |\n|---|---|---|---|---|---|---|")
  base = None
  for name, shape, opt_state in MESHES:
    c = planner.apply_overrides(cfg, {"mesh.data": shape[0], "mesh.fsdp": shape[1],
                                      "mesh.tensor": shape[2], "mesh.opt_state": opt_state})
    compiled = planner.build_step(c, 256, jax.devices()).compile()
    mem = compiled.memory_analysis()
    ana = planner.analytic_estimate(planner.model_shape(c, 256, "cpu"),
                                    planner.Layout(*shape, 1, "none"), target)
    base = base or mem.argument_size_in_bytes
    print(f"| {name} | {shape} | {mem.argument_size_in_bytes / MiB:.2f} | "
          f"{mem.temp_size_in_bytes / MiB:.2f} | {planner.compiled_memory(compiled) / MiB:.2f} |"
          f" {ana.memory / MiB:.2f} | {mem.argument_size_in_bytes / base:.3f} |", flush=True)


def remat_table(args) -> None:
  cfg = config(args)
  print(f"\nremat policies, one device, batch {args.batch} x {args.seq}, {args.layers} layers"
        f" (median of {args.repeats} windows of {args.steps} steps)")
  print("| remat | temp MiB | total MiB | step ms | vs none |\n|---|---|---|---|---|")
  rows = []
  for remat in planner.REMAT_CHOICES:
    c = planner.apply_overrides(cfg, {"mesh.data": 1, "model.remat": remat})
    b = planner.build_step(c, 256, jax.devices()[:1])
    compiled = b.compile()
    with jax.set_mesh(b.mesh):
      state = jax.jit(b.init_fn, out_shardings=b.shardings)(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    tok = rng.integers(0, 256, (args.batch, args.seq), dtype=np.int32)
    batch = {"inputs": tok, "targets": np.roll(tok, -1, axis=1)}
    state, _ = compiled(state, batch)
    _, step_s = median_step_seconds(compiled, state, batch, args.steps, args.repeats)
    rows.append((remat, compiled.memory_analysis().temp_size_in_bytes,
                 planner.compiled_memory(compiled), step_s))
  ref = rows[0][3]
  for remat, temp, total, t in rows:
    print(f"| {remat} | {temp / MiB:.2f} | {total / MiB:.2f} | {1e3 * t:.1f} | "
          f"{t / ref:.2f}x |", flush=True)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--d-model", type=int, default=256)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args(argv)
  print(f"jax {jax.__version__}, {len(jax.devices())} devices, load {os.getloadavg()}")
  mesh_table(args)
  remat_table(args)
  print(f"load at end {os.getloadavg()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
