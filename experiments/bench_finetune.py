"""lmos against a plain transformers + torch loop, finetuning MiniLM-L6 on SST-2, end to end.

Both sides finetune the same pretrained all-MiniLM-L6-v2 (`minilm_dir()`, a fresh 2-label
classifier head, dropout 0.1) for one epoch over the first N sentences of SST-2's train.tsv,
then score the whole dev.tsv:

  lmos  `lmos train --config configs/bert_sst2.py:full,N` as users run it (batch 32, seq len
        64, length buckets grouped within windows of batches, its checkpoint at the end).
  peer  AutoModelForSequenceClassification + AutoTokenizer + torch.optim.AdamW (fused where
        the CPU build has it, else foreach), get_linear_schedule_with_warmup, clip_grad_norm_
        1.0: a shuffled order (seeded torch.Generator), batch 32, each batch padded to its own
        longest sentence (truncation at 64 tokens), torch threads = the cores of the process;
        dev accuracy in eval mode, batch 64, no grad.

The hyperparameters are the config's: lr 1e-4, warmup max(10, steps // 16) (capped at the
steps) then linear to 0, AdamW b1 0.9, b2 0.999, eps 1e-8, weight decay 0.01 on what lmos
decays by default (no biases, norms or embeddings: `lmos_jax/train/optim.py`).

Each side runs in its own fresh subprocess, alternating lmos, peer, lmos, peer, ... for
--repeats, and the parent times each process from launch to exit (start-up, imports, model
loading, training, eval and exit all included). Training sentences/s is N over the training
loop alone (lmos: wall_time.jsonl's first_step + steps, compiles included; peer: its loop).
Results go to OUT/bench_finetune.json; each process's output to OUT/{lmos,peer}_K.log.

Run: python3 experiments/bench_finetune.py --sentences 16000 [--repeats 1] [--data DIR] \
       [--out DIR] [--batch-size 32]
--data is a folder holding SST-2's train.tsv and dev.tsv; default $LMOS_DATA_DIR/sst2 (data/sst2).
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the worker's own clock starts before its heavy imports

import argparse  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from lmos_jax.config.datadir import data_dir  # noqa: E402

from side_by_side import ROOT, fail, lmos_command, machine, timed  # noqa: E402

CONFIG = ROOT / "configs" / "bert_sst2.py"
CONFIG_BATCH = 32  # configs/bert_sst2.py with a budget
LR, BETAS, EPS, WEIGHT_DECAY, CLIP, DROPOUT, SEQ_LEN = 1e-4, (0.9, 0.999), 1e-8, 0.01, 1.0, 0.1, 64
EVAL_BATCH = 64
TEXT_COLUMNS = ("sentence", "text", "content", "sentence1", "question", "review")  # lmos's


def schedule(sentences: int, batch: int) -> tuple[int, int]:
  """(steps, warmup) of one epoch as configs/bert_sst2.py sets them; lmos's make_schedule
  caps the warmup at the steps, so the peer gets the capped value too."""
  steps = math.ceil(sentences / batch)
  return steps, min(max(10, steps // 16), steps)


def read_sst2(path: Path, limit: int = 0) -> tuple[list[str], list[int]]:
  """Sentences and labels of an SST-2 TSV (a header naming `label` and the text column, CRLF
  or LF), the first `limit` rows (0: all), blank rows skipped: what lmos's read_tsv keeps."""
  text = path.read_bytes().decode("utf-8")
  reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
  header = [h.strip() for h in next(reader, [])]
  others = [h for h in header if h != "label"]
  text_col = next((c for c in TEXT_COLUMNS if c in others), others[0] if len(others) == 1
                  else None)
  if "label" not in header or text_col is None:
    raise SystemExit(f"{path}: the header {header} names no 'label' column or no text column")
  il, isent = header.index("label"), header.index(text_col)
  sents, labels = [], []
  for row in reader:
    if not row or all(not c.strip() for c in row):
      continue
    sents.append(row[isent])
    labels.append(int(row[il].strip()))
    if limit and len(sents) >= limit:
      break
  return sents, labels


# ------------------------------------------------------------------------- the peer worker

def decays(name: str) -> bool:
  """lmos's default AdamW mask on HF BERT names: no biases, norms or embeddings."""
  low = name.lower()
  return not (name.endswith(".bias") or "norm" in low or ".embeddings." in f".{low}")


def peer_worker(args) -> int:
  """One epoch of a plain transformers + torch finetune, then dev accuracy; one JSON line."""
  import numpy as np
  import torch
  from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                            get_linear_schedule_with_warmup)
  from lmos_jax.models.hf import minilm_dir

  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  torch.set_num_threads(cores)
  torch.manual_seed(args.seed)  # the fresh classifier head
  hf_dir = str(minilm_dir())
  tok = AutoTokenizer.from_pretrained(hf_dir)
  model = AutoModelForSequenceClassification.from_pretrained(
      hf_dir, num_labels=2, hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=DROPOUT)
  model = model.float().train()
  data = Path(args.data)
  sents, labels = read_sst2(data / "train.tsv", args.sentences)
  dev_sents, dev_labels = read_sst2(data / "dev.tsv")
  enc = tok(sents, truncation=True, max_length=SEQ_LEN)["input_ids"]
  dev_enc = tok(dev_sents, truncation=True, max_length=SEQ_LEN)["input_ids"]
  pad_id = tok.pad_token_id or 0

  def collate(ids: list[list[int]]):
    width = max(len(x) for x in ids)
    arr = np.full((len(ids), width), pad_id, np.int64)
    mask = np.zeros((len(ids), width), np.int64)
    for i, x in enumerate(ids):
      arr[i, :len(x)], mask[i, :len(x)] = x, 1
    return torch.from_numpy(arr), torch.from_numpy(mask)

  named = list(model.named_parameters())
  groups = [{"params": [p for n, p in named if decays(n)], "weight_decay": WEIGHT_DECAY},
            {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0}]
  try:
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, fused=True)
    fused = "fused"
  except (RuntimeError, TypeError, ValueError):
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, foreach=True)
    fused = "foreach"
  steps, warmup = schedule(len(sents), args.batch_size)
  sched = get_linear_schedule_with_warmup(opt, warmup, steps)
  order = torch.randperm(len(sents), generator=torch.Generator().manual_seed(args.seed)).tolist()
  y_all = torch.tensor(labels, dtype=torch.long)
  setup_s = time.perf_counter() - T0

  t0 = time.perf_counter()
  losses = []
  for s in range(steps):
    idx = order[s * args.batch_size:(s + 1) * args.batch_size]
    x, mask = collate([enc[i] for i in idx])
    out = model(input_ids=x, attention_mask=mask, labels=y_all[idx])
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    sched.step()
    losses.append(out.loss.detach())
  train_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  model.eval()
  correct = 0
  with torch.no_grad():
    for i in range(0, len(dev_enc), EVAL_BATCH):
      x, mask = collate(dev_enc[i:i + EVAL_BATCH])
      pred = model(input_ids=x, attention_mask=mask).logits.argmax(-1)
      correct += int((pred == torch.tensor(dev_labels[i:i + EVAL_BATCH])).sum())
  eval_s = time.perf_counter() - t0
  tail = losses[-max(len(losses) // 10, 1):]
  print("RESULT " + json.dumps({
      "setup_s": setup_s, "train_s": train_s, "eval_s": eval_s, "steps": steps,
      "warmup": warmup, "sentences": len(sents), "sentences_per_s": len(sents) / train_s,
      "dev_accuracy": correct / len(dev_enc), "train_loss": float(torch.stack(tail).mean()),
      "threads": torch.get_num_threads(), "adamw": fused,
      "decayed_params": sum(p.numel() for p in groups[0]["params"]),
      "undecayed_params": sum(p.numel() for p in groups[1]["params"])}), flush=True)
  return 0


# ------------------------------------------------------------------------------ the parent


def last_row(path: Path, key: str) -> dict:
  rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() \
      else []
  rows = [r for r in rows if key in r]
  return rows[-1] if rows else {}


def run_lmos(k: int, args, data: Path, out: Path) -> dict | int:
  wd = out / f"lmos_{k}"
  if wd.exists():
    shutil.rmtree(wd)  # a fresh run every repeat, never a resume
  steps, warmup = schedule(args.sentences, args.batch_size)
  cmd = lmos_command() + ["train", "--config", f"{CONFIG}:full,{args.sentences}",
                          "--workdir", str(wd), "--config.train.progress=False",
                          f"--config.train.precision={args.precision}",
                          f"--config.data.train={data / 'train.tsv'}",
                          f"--config.data.dev={data / 'dev.tsv'}"]
  if args.batch_size != CONFIG_BATCH:  # the same epoch and schedule at another batch size
    every = min(500, steps)
    cmd += [f"--config.train.batch_size={args.batch_size}", f"--config.train.steps={steps}",
            f"--config.train.warmup_steps={warmup}", f"--config.train.eval_every={every}",
            f"--config.train.ckpt_every={every}"]
  log = out / f"lmos_{k}.log"
  wall, rc = timed(cmd, log)
  if rc:
    return fail("bench_finetune", "the lmos run", log, rc)
  ev = last_row(wd / "metrics.jsonl", "eval_accuracy")
  parts = last_row(wd / "wall_time.jsonl", "steps")
  if not ev or not parts:
    print(f"bench_finetune: {wd} has no eval_accuracy row in metrics.jsonl or no "
          "wall_time.jsonl", file=sys.stderr)
    return 1
  train_s = parts.get("first_step", 0.0) + parts["steps"]
  return {"side": "lmos", "repeat": k, "wall_s": wall, "setup_s": parts.get("startup", 0.0),
          "train_s": train_s, "eval_s": parts.get("eval", 0.0),
          "steps_only_s": parts["steps"], "sentences_per_s": args.sentences / train_s,
          "dev_accuracy": ev["eval_accuracy"], "wall_parts": parts, "steps": steps}


def run_peer(k: int, args, data: Path, out: Path) -> dict | int:
  cmd = [sys.executable, str(Path(__file__).resolve()), "--peer-worker",
         "--sentences", str(args.sentences), "--data", str(data),
         "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
  log = out / f"peer_{k}.log"
  wall, rc = timed(cmd, log)
  lines = [l for l in log.read_text(errors="replace").splitlines() if l.startswith("RESULT ")]
  if rc or not lines:
    return fail("bench_finetune", "the peer run", log, rc)
  res = json.loads(lines[-1][len("RESULT "):])
  return {"side": "peer", "repeat": k, "wall_s": wall, **res}


NAMES = {"lmos": "lmos train (configs/bert_sst2.py:full)", "peer": "transformers + torch"}


def run_table(rows: list[dict]) -> str:
  out = ["| repeat | impl | wall s | setup s | train loop s | eval s | other s | "
         "train sent/s | dev acc |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    other = r["wall_s"] - r["setup_s"] - r["train_s"] - r["eval_s"]
    out.append(f"| {r['repeat']} | {NAMES[r['side']]} | {r['wall_s']:.1f} | {r['setup_s']:.1f} "
               f"| {r['train_s']:.1f} | {r['eval_s']:.1f} | {other:.1f} | "
               f"{r['sentences_per_s']:.1f} | {100 * r['dev_accuracy']:.2f} |")
  return "\n".join(out)


def summarize(rows: list[dict]) -> dict:
  med = lambda side, key: statistics.median(r[key] for r in rows if r["side"] == side)  # noqa
  pairs = [(a, b) for a in rows for b in rows
           if a["side"] == "lmos" and b["side"] == "peer" and a["repeat"] == b["repeat"]]
  out = {side: {key: med(side, key) for key in
                ("wall_s", "setup_s", "train_s", "eval_s", "sentences_per_s", "dev_accuracy")}
         for side in ("lmos", "peer")}
  out["wall_ratio_lmos_over_peer"] = statistics.median(a["wall_s"] / b["wall_s"]
                                                       for a, b in pairs)
  out["train_speed_ratio_lmos_over_peer"] = statistics.median(
      a["sentences_per_s"] / b["sentences_per_s"] for a, b in pairs)
  return out


def summary_table(s: dict, rows: list[dict], repeats: int) -> str:
  out = [f"| impl (median of {repeats}) | wall s | train loop s | train sent/s | dev acc "
         "(range) |", "|---|---|---|---|---|"]
  for side in ("lmos", "peer"):
    accs = [100 * r["dev_accuracy"] for r in rows if r["side"] == side]
    m = s[side]
    out.append(f"| {NAMES[side]} | {m['wall_s']:.1f} | {m['train_s']:.1f} | "
               f"{m['sentences_per_s']:.1f} | {100 * m['dev_accuracy']:.2f} "
               f"({min(accs):.2f}-{max(accs):.2f}) |")
  out += ["", f"lmos wall / peer wall: {s['wall_ratio_lmos_over_peer']:.2f}x (median of the "
          f"per-repeat ratios; below 1 means lmos finishes sooner); training sentences/s, lmos / "
          f"peer: {s['train_speed_ratio_lmos_over_peer']:.2f}x"]
  return "\n".join(out)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sentences", type=int, default=16000,
                  help="training sentences: the first N rows of train.tsv, one epoch")
  ap.add_argument("--repeats", type=int, default=1, help="lmos/peer pairs, alternating")
  ap.add_argument("--data", default=str(data_dir() / "sst2"),
                  help="folder with train.tsv and dev.tsv (default: $LMOS_DATA_DIR/sst2)")
  ap.add_argument("--out", default="runs/bench_finetune")
  ap.add_argument("--batch-size", type=int, default=CONFIG_BATCH)
  ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16_matmul"),
                  help="lmos's train.precision (auto: as lmos train picks it; the peer is float32)")
  ap.add_argument("--seed", type=int, default=0, help="the peer's shuffle and head init")
  ap.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)  # worker mode
  args = ap.parse_args(argv)
  if args.sentences <= 0 or args.repeats <= 0 or args.batch_size <= 0:
    ap.error("--sentences, --repeats and --batch-size must be positive")
  if args.peer_worker:
    return peer_worker(args)

  data = Path(args.data).expanduser().resolve()
  for name in ("train.tsv", "dev.tsv"):
    if not (data / name).is_file():
      print(f"bench_finetune: no SST-2 {name} at {data / name}; set LMOS_DATA_DIR to the "
            "folder holding sst2/ or pass --data (the folder with train.tsv and dev.tsv)",
            file=sys.stderr)
      return 2
  rows_in_file = len(read_sst2(data / "train.tsv")[0])
  if args.sentences > rows_in_file:
    print(f"bench_finetune: --sentences {args.sentences} but {data / 'train.tsv'} has "
          f"{rows_in_file} rows; ask for at most that many", file=sys.stderr)
    return 2
  try:
    from lmos_jax.models.hf import minilm_dir
    minilm_dir()
  except ModuleNotFoundError as e:
    print(f"bench_finetune: {e}", file=sys.stderr)
    return 2
  out = Path(args.out).expanduser().resolve()
  out.mkdir(parents=True, exist_ok=True)

  mach = machine()
  steps, warmup = schedule(args.sentences, args.batch_size)
  print(f"{mach['cpu']}, {mach['cores_available']} of {mach['cpu_count']} cores; torch "
        f"{mach['torch']}, transformers {mach['transformers']}, jax {mach['jax']}; "
        f"{args.sentences} sentences, batch {args.batch_size}, {steps} steps, warmup {warmup}; "
        f"load {os.getloadavg()}", flush=True)
  rows = []
  for k in range(1, args.repeats + 1):
    for side, fn in (("lmos", run_lmos), ("peer", run_peer)):
      r = fn(k, args, data, out)
      if isinstance(r, int):
        return r
      rows.append(r)
      print(f"[{k}/{args.repeats}] {side}: wall {r['wall_s']:.1f} s, train loop "
            f"{r['train_s']:.1f} s, dev acc {100 * r['dev_accuracy']:.2f}"
            + (f"; lmos train: {r['wall_parts']}" if side == "lmos" else
               f"; {r['threads']} threads, AdamW {r['adamw']}"), flush=True)
    print("\n" + run_table([r for r in rows if r["repeat"] == k]) + "\n", flush=True)
  s = summarize(rows)
  print(summary_table(s, rows, args.repeats))
  print(f"\nload at end {os.getloadavg()}")
  result = {"machine": mach, "args": {k: v for k, v in vars(args).items() if k != "peer_worker"},
            "steps": steps, "warmup": warmup, "runs": rows, "summary": s}
  (out / "bench_finetune.json").write_text(json.dumps(result, indent=2) + "\n")
  print(f"results: {out / 'bench_finetune.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
