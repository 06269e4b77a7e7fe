"""bf16 kernels on this machine: XLA's dot by operand/output dtype, then a served classifier.

Part 1 times one jitted `lax.dot_general` at a served MiniLM batch's shapes (640 tokens,
384 <-> 1536) for float32 operands, bf16 operands with bf16 output, and bf16 operands with
float32 output (what `lmos compress --method bf16` runs). Part 2, given --workdir (a
classifier) and --bf16 (the same run after `lmos compress --method bf16`), times the packed
forward the server runs (`load_classifier` + `run_packed`) on 32 questions and on one,
both models in one process, in turns. Times are medians of --rounds rounds.

  python3 experiments/bench_bf16.py
  python3 experiments/bench_bf16.py --workdir runs/banking77 --bf16 runs/banking77_bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lmos_jax.config.datadir import data_file


def median_ms(fn, rounds: int, calls: int) -> float:
  """Median over rounds of the mean wall time of `calls` calls (after two warm-up calls)."""
  fn(), fn()
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(calls):
      fn()
    times.append((time.perf_counter() - t0) / calls)
  return 1e3 * statistics.median(times)


def dot_table(rounds: int) -> None:
  rng = np.random.default_rng(0)
  print("| x @ w | operands -> output | ms | vs float32 |")
  print("|---|---|---:|---:|")
  for m, k, n in ((640, 384, 1536), (640, 1536, 384)):
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
    forms = {"f32 -> f32": (x, w, jnp.float32),
             "bf16 -> bf16": (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), jnp.bfloat16),
             "bf16 -> f32": (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), jnp.float32)}
    base = None
    for name, (a, b, out) in forms.items():
      f = jax.jit(lambda a, b, out=out: jax.lax.dot_general(
          a, b, (((1,), (0,)), ((), ())), preferred_element_type=out))
      ms = median_ms(lambda: f(a, b).block_until_ready(), rounds, 20)
      base = base or ms
      print(f"| {m}x{k} @ {k}x{n} | {name} | {ms:.2f} | {base / ms:.2f}x |")


def forward_table(workdir: str, bf16: str, rounds: int) -> None:
  from lmos_jax.data.encoder import bucket_widths
  from lmos_jax.inference.predict import load_classifier, run_packed
  dev = data_file("apps/banking77/dev.tsv")
  texts = [line.split("\t")[0] for line in Path(dev).read_text().splitlines()[1:]]
  models = {"float32": load_classifier(workdir), "bf16": load_classifier(bf16)}
  print("| questions | float32 ms | bf16 ms | float32 / bf16 |")
  print("|---:|---:|---:|---:|")
  for n, calls in ((32, 10), (1, 50)):
    ms = {}
    for _ in range(2):  # in turns, so that a change in load hits both
      for name, clf in models.items():
        widths = bucket_widths("auto", clf.cfg.data.seq_len)
        ms.setdefault(name, []).append(median_ms(
            lambda: run_packed(clf, texts[:n], None, widths, 32, 32), rounds, calls))
    a, b = min(ms["float32"]), min(ms["bf16"])
    print(f"| {n} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", help="a classifier workdir (float32)")
  ap.add_argument("--bf16", help="the same run written by `lmos compress --method bf16`")
  ap.add_argument("--rounds", type=int, default=5)
  args = ap.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"{jax.device_count()} device(s)\n")
  dot_table(args.rounds)
  if args.workdir and args.bf16:
    print()
    forward_table(args.workdir, args.bf16, args.rounds)


if __name__ == "__main__":
  main()
