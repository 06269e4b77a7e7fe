"""SST-2 finetuning of MiniLM-L6: full vs LoRA vs Houlsby adapters vs AdaLoRA, one at a time.

Each method trains in its own subprocess (configs/bert_sst2.py:METHOD, 1 epoch over the
first data.max_train sentences, whole dev set), which reports its dev accuracy, trainable
params, wall time and peak RSS (getrusage maxrss of that process). Prints a markdown table.

Run: python3 experiments/finetune_sst2.py --out runs/sst2 [--methods full,lora] \
       [--max_train 1500] [--data DIR]
--data is a folder holding SST-2's train.tsv and dev.tsv; default $LMOS_DATA_DIR/sst2 (data/sst2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from lmos_jax.config.datadir import data_dir

# Published SST-2 dev (GLUE validation) accuracies of small encoders, each with where it is
# printed, for scale: full finetuning on all 67k training sentences over several epochs
# (this script trains on a slice of them for one short run).
PUBLISHED = [
    ("BERT-base", "109M", 93.2, "MiniLM model card (huggingface.co/microsoft/MiniLM-L12-H384-uncased)"),
    ("MiniLM-L12-H384", "33M", 93.0, "the same card"),
    ("DistilBERT-base", "66M", 91.06,
     "huggingface.co/distilbert/distilbert-base-uncased-finetuned-sst-2-english, eval results"),
    ("MiniLMv2-L6-H384", "30M (50k-token vocabulary)", 91.97,
     "huggingface.co/philschmid/MiniLMv2-L6-H384-sst2, 5 epochs"),
]


def run_one(method: str, workdir: str, data: str, max_train: int) -> dict:
  """Trains one method in this process; returns its measurements (called in a subprocess)."""
  from lmos_jax.config.loading import load_config_file
  from lmos_jax.peft.wrap import count_trainable
  from lmos_jax.train.trainer import build_run, train

  cfg = load_config_file(f"configs/bert_sst2.py:{method}")
  cfg.data.train, cfg.data.dev = f"{data}/train.tsv", f"{data}/dev.tsv"
  cfg.data.max_train = max_train
  cfg.train.steps = -(-max_train // cfg.train.batch_size)
  cfg.train.eval_every = cfg.train.ckpt_every = cfg.train.steps
  cfg.train.progress = False
  t0 = time.perf_counter()
  last = train(cfg, workdir)
  wall = time.perf_counter() - t0
  run = build_run(cfg)
  n_train, n_total = count_trainable(run.abstract_state["params"], run.trainable)
  return {"method": method, "dev_accuracy": last["eval_accuracy"], "dev_loss": last["eval_loss"],
          "train_loss": last["loss"], "trainable": n_train, "total": n_total,
          "steps": cfg.train.steps, "train_sentences": max_train, "wall_s": wall,
          "tokens_per_sec": last.get("tokens_per_sec", float("nan")),
          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def table(rows: list[dict]) -> str:
  out = ["| method | SST-2 dev acc | trainable params | % of model | steps (sent.) | wall s | "
         "train tok/s | peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['method']} | {100 * r['dev_accuracy']:.2f} | {r['trainable']:,} | "
               f"{100 * r['trainable'] / r['total']:.3f} | {r['steps']} ({r['train_sentences']}) "
               f"| {r['wall_s']:.0f} | {r['tokens_per_sec']:.0f} | {r['peak_rss_mib']:.0f} |")
  out += ["", "Published (full training set, not measured here):", "",
          "| model | params | SST-2 dev acc | source |", "|---|---|---|---|"]
  out += [f"| {name} | {size} | {acc} | {src} |" for name, size, acc, src in PUBLISHED]
  return "\n".join(out)


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="runs/sst2")
  ap.add_argument("--methods", default="lora,adapters,adalora,full")
  ap.add_argument("--max_train", type=int, default=1500)
  ap.add_argument("--data", default=str(data_dir() / "sst2"),
                  help="folder with train.tsv and dev.tsv (default: $LMOS_DATA_DIR/sst2)")
  ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # child mode
  args = ap.parse_args()
  if args.one:
    print("RESULT " + json.dumps(run_one(args.one, f"{args.out}/{args.one}", args.data,
                                         args.max_train)), flush=True)
    return 0
  rows = []
  env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
  for method in args.methods.split(","):
    wd = Path(args.out) / method
    if wd.exists():
      raise SystemExit(f"{wd} exists; use a fresh --out (a resumed run would skew times)")
    proc = subprocess.run([sys.executable, __file__, "--one", method, "--out", args.out,
                           "--max_train", str(args.max_train), "--data", args.data],
                          capture_output=True, text=True, env=env)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not line:
      print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
      raise SystemExit(f"method {method} failed (exit {proc.returncode})")
    rows.append(json.loads(line[0][len("RESULT "):]))
    print(json.dumps(rows[-1]), flush=True)
  print(table(rows))
  Path(args.out, "table.md").write_text(table(rows) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
