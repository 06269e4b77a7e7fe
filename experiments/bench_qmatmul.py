"""Batch-1 matvec speed of dense float32 against int8 weight forms, on GPT-2's layer kernels.

Decoding one token at a time multiplies a (1, D) activation by every kernel: if that were
bound by reading weights, int8 codes (1 byte) would run up to 4x faster than float32 (4
bytes). This measures what the backend's compiler makes of each form, for a stack of
`--layers` GPT-2 layers (four kernels each: 768x2304, 768x768, 768x3072, 3072x768), unrolled
so every kernel is its own buffer, as the CPU decoder runs them:

  dense float32          x @ W
  int8 / int4, lmos      lmos's QArray.matmul (what `lmos compress --method int8|int4`
                         runs): on CPU the C++ kernel of lmos_jax/models/cpu_qmatmul.cc
  int8, lmos jax.numpy   the same product in jax.numpy (LMOS_CPU_KERNELS=off, and other
                         backends): codes converted next to the dot, per-channel scale on
                         the product
  int8, output-major     codes stored (O, I), converted, multiplied and summed over I in one
                         fused loop
  int8, tiled 32         codes stored (O/32, I, 32), summed over I 32 outputs at a time
  int8 x int8 (W8A8)     activation quantized per row, int8 x int8 -> int32 dot_general
  int8 / int4, qwix      qwix.quantize (per channel; int4 in tiles of 32 inputs) and
                         qwix.dot with the float activation, when qwix is installed (the
                         `qwix` extra)

Run: python3 experiments/bench_qmatmul.py [--layers 12] [--repeats 5]
Prints ms per pass over the stack, weight bytes, effective GB/s and the ratio to dense.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lmos_jax.models.quantized import pack_halves, qmatmul, qmatmul_xla

D = 768
SHAPES = ((D, 3 * D), (D, D), (D, 4 * D), (4 * D, D))  # (in, out) per kernel


def dense_mm(x_BI, w_IO, s_O):
  del s_O
  return x_BI @ w_IO


def lmos_mm(x_BI, q_IO, s_O):
  return qmatmul(x_BI, q_IO, s_O[None], 8)


def lmos_xla_mm(x_BI, q_IO, s_O):
  return qmatmul_xla(x_BI, q_IO, s_O[None], 8)


def lmos_int4_mm(x_BI, q_HO, s_O):
  return qmatmul(x_BI, q_HO, s_O[None], 4)


def output_major_mm(x_BI, q_OI, s_O):
  return (jnp.sum(q_OI.astype(jnp.float32) * x_BI[0][None, :], axis=1) * s_O)[None]


def tiled_mm(x_BI, q_NIt, s_O):
  y_Nt = jnp.sum(q_NIt.astype(jnp.float32) * x_BI[0][None, :, None], axis=1)
  return (y_Nt.reshape(-1) * s_O)[None]


def w8a8_mm(x_BI, q_IO, s_O):
  xs_B1 = jnp.max(jnp.abs(x_BI), axis=-1, keepdims=True) / 127 + 1e-12
  xq_BI = jnp.round(x_BI / xs_B1).astype(jnp.int8)
  acc_BO = lax.dot_general(xq_BI, q_IO, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.int32)
  return acc_BO.astype(jnp.float32) * xs_B1 * s_O


def qwix_mm(x_BI, w_q, s_O):
  import qwix
  del s_O
  return qwix.dot(x_BI, w_q)


def qwix_forms(codes: list, scales: list) -> dict:
  """qwix's weight-only int8 / int4 of the same weights, if the library is installed."""
  try:
    import qwix
  except ImportError:
    return {}
  def quantized(qtype, tiles):
    return [[qwix.quantize(jnp.asarray(c.astype(np.float32) * 1e-3), qtype,
                           channelwise_axes=[1], tiled_axes=tiles) for c in layer]
            for layer in codes]
  return {"int8, qwix": (qwix_mm, quantized(jnp.int8, None), scales),
          "int4, qwix": (qwix_mm, quantized(jnp.int4, {0: 32}), scales)}


def stack_passes(mm, calls: int):
  """`calls` passes over the layers inside one compiled loop, as a decode loop runs them:
  temporaries are allocated once and reused (a fresh call per pass would time the first
  touch of every converted kernel's buffer). The residual keeps the passes dependent."""
  def one_pass(h_BD, kernels, scales):
    for ws, ss in zip(kernels, scales):
      qkv = mm(h_BD, ws[0], ss[0])  # every output used: a slice would let XLA skip columns
      a = qkv[:, :D] + qkv[:, D:2 * D] + qkv[:, 2 * D:]
      b = mm(a, ws[1], ss[1])
      c = mm(b, ws[2], ss[2])
      h_BD = h_BD + 1e-3 * mm(jnp.tanh(c), ws[3], ss[3])
    return h_BD

  def run(x_BD, kernels, scales):
    return lax.fori_loop(0, calls, lambda _, h: one_pass(h, kernels, scales), x_BD)
  return jax.jit(run)


def forms(layers: int, rng: np.random.Generator) -> dict:
  """name -> (matmul, per-layer kernels, per-layer scales)."""
  codes = [[rng.integers(-127, 128, s, dtype=np.int8) for s in SHAPES] for _ in range(layers)]
  scales = [[jnp.asarray(rng.random(s[1], dtype=np.float32) * 1e-3) for s in SHAPES]
            for _ in range(layers)]
  as_jnp = lambda f: [[jnp.asarray(f(c)) for c in layer] for layer in codes]  # noqa: E731
  return {
      "dense float32": (dense_mm, as_jnp(lambda c: c.astype(np.float32) * 1e-3), scales),
      "int8, lmos": (lmos_mm, as_jnp(lambda c: c), scales),
      "int8, lmos jax.numpy": (lmos_xla_mm, as_jnp(lambda c: c), scales),
      "int4, lmos": (lmos_int4_mm, as_jnp(lambda c: pack_halves(jnp.asarray(c >> 4))), scales),
      "int8, output-major": (output_major_mm, as_jnp(lambda c: np.ascontiguousarray(c.T)),
                             scales),
      "int8, tiled 32": (tiled_mm, as_jnp(lambda c: np.ascontiguousarray(
          c.reshape(c.shape[0], -1, 32).transpose(1, 0, 2))), scales),
      "int8 x int8 (W8A8)": (w8a8_mm, as_jnp(lambda c: c), scales),
      **qwix_forms(codes, scales),
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--calls", type=int, default=20, help="passes per timed loop")
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  x_BD = jnp.asarray(rng.standard_normal((1, D)).astype(np.float32))
  runs = {}
  for name, (mm, kernels, scales) in forms(args.layers, rng).items():
    fn = stack_passes(mm, args.calls)
    fn(x_BD, kernels, scales).block_until_ready()  # compile
    nbytes = sum(int(x.nbytes) for x in jax.tree.leaves(kernels))
    runs[name] = (lambda fn=fn, k=kernels, s=scales: fn(x_BD, k, s), nbytes)
  best = {name: float("inf") for name in runs}
  for _ in range(args.repeats):  # forms in turns, so load changes hit all alike
    for name, (call, _) in runs.items():
      t0 = time.perf_counter()
      call().block_until_ready()
      best[name] = min(best[name], (time.perf_counter() - t0) / args.calls)
  print(f"batch-1 matvecs over {args.layers} GPT-2 layers, unrolled; best of {args.repeats} x "
        f"{args.calls} passes; jax {jax.__version__} on {jax.devices()[0].platform}\n")
  print("| form | ms per pass | weight bytes | GB/s | vs dense float32 |\n|---|---:|---:|---:|---:|")
  for name, (_, nbytes) in runs.items():
    t = best[name]
    print(f"| {name} | {t * 1e3:.2f} | {nbytes:,} | {nbytes / t / 1e9:.1f} | "
          f"{best['dense float32'] / t:.2f}x |")


if __name__ == "__main__":
  main()
