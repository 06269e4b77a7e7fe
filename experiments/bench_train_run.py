"""Whole training runs, launch to exit: `lmos train` against a nanoGPT-equivalent PyTorch script.

experiments/bench_train.py compares steady-state steps; a user waits for the whole process:
start-up, compiles, data, evaluations, checkpoints and the final sample included. Here each
contender runs nanoGPT's shakespeare-char CPU setting (4 layers, 4 heads, 128 wide, block 64,
batch 12, lr 1e-3 with 100 warmup steps and cosine decay to 1e-4, AdamW b2 0.99, weight decay
0.1, clip 1.0, no dropout, no biases, tied embeddings; --steps updates) as a fresh process:

  lmos, cold   `lmos train --config configs/shakespeare_char.py:cpu --workdir W` with
               LMOS_COMPILE_CACHE set to a new empty directory (a first run on a machine)
  lmos, warm   the same command again with the same cache directory (every later run)
  nanoGPT      this file's --peer-worker mode: nanoGPT's train.py loop written out (its
               model from experiments/bench_train.py with biases off, AdamW fused where torch
               has it on CPU, else foreach; random batches as nanoGPT's get_batch draws them,
               the next batch fetched before the backward pass; train and val losses over 20
               batches each at step 0 and every 250 steps; a torch.save checkpoint of model
               and optimizer whenever val improves; the loss printed every 10 steps)

lmos does at least the same work: it evaluates val (20 batches) every 250 steps, checkpoints
every 500 steps and at the end (orbax, asynchronously), and samples 200 characters at the end.
Contenders alternate (cold, warm, nanoGPT, then again for --repeats); each is timed by this
script from launch to exit. Printed per contender: wall seconds, seconds to the first step,
the final val loss, and the ratios lmos / nanoGPT; and the warm run's start-up (launch to
first step) as a share of the cold run's.

Run: python3 experiments/bench_train_run.py [--steps 2000] [--repeats 1] [--out DIR]
     [--precision auto|fp32|bf16_matmul]
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the worker's clock starts before its heavy imports

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from side_by_side import ROOT, fail, lmos_command, machine, timed  # noqa: E402

# nanoGPT's shakespeare-char CPU setting (its README's CPU command)
LAYERS, HEADS, D, BLOCK, BATCH = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP, B1, B2, WD, CLIP = 1e-3, 1e-4, 100, 0.9, 0.99, 0.1, 1.0
EVAL_EVERY, EVAL_ITERS, LOG_EVERY = 250, 20, 10


def nanogpt_lr(it: int, steps: int) -> float:
  """nanoGPT's get_lr: linear warmup, cosine decay to MIN_LR at `steps`."""
  if it < WARMUP:
    return LR * (it + 1) / (WARMUP + 1)
  if it > steps:
    return MIN_LR
  ratio = (it - WARMUP) / (steps - WARMUP)
  return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def peer_worker(data_path: str, steps: int, out_dir: Path) -> int:
  """nanoGPT's train.py at the settings above; one JSON line of results on stdout."""
  import numpy as np
  import torch
  from bench_train import nanogpt_model

  torch.manual_seed(1337)
  text = Path(data_path).read_text(encoding="utf-8")
  chars = sorted(set(text))
  stoi = {c: i for i, c in enumerate(chars)}
  ids = np.array([stoi[c] for c in text], dtype=np.uint16)
  n = int(0.9 * len(ids))
  splits = {"train": ids[:n], "val": ids[n:]}

  def get_batch(split: str):
    d = splits[split]
    ix = torch.randint(len(d) - BLOCK, (BATCH,))
    x = torch.stack([torch.from_numpy(d[i:i + BLOCK].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(d[i + 1:i + 1 + BLOCK].astype(np.int64))
                     for i in ix.tolist()])
    return x, y

  model = nanogpt_model(torch, len(chars), LAYERS, HEADS, D, BLOCK, 0.02, 1e-5, bias=False)
  params = list(model.named_parameters())
  decay = [p for _, p in params if p.dim() >= 2]
  rest = [p for _, p in params if p.dim() < 2]
  groups = [{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}]
  try:
    opt = torch.optim.AdamW(groups, lr=LR, betas=(B1, B2), fused=True)
  except (RuntimeError, TypeError):
    opt = torch.optim.AdamW(groups, lr=LR, betas=(B1, B2), foreach=True)

  def loss_of(x, y):
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

  @torch.no_grad()
  def estimate_loss() -> dict:
    model.eval()
    out = {s: float(np.mean([float(loss_of(*get_batch(s))) for _ in range(EVAL_ITERS)]))
           for s in ("train", "val")}
    model.train()
    return out

  spent = {"eval": 0.0, "checkpoint": 0.0}
  best, last, first_step = float("inf"), {}, None
  x, y = get_batch("train")
  t_loop = time.perf_counter()
  for it in range(steps + 1):
    if it % EVAL_EVERY == 0:
      t = time.perf_counter()
      last = estimate_loss()
      spent["eval"] += time.perf_counter() - t
      if last["val"] < best and it > 0:
        best = last["val"]
        t = time.perf_counter()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter": it,
                    "best_val_loss": best}, out_dir / "ckpt.pt")
        spent["checkpoint"] += time.perf_counter() - t
    if it == steps:
      break
    for g in opt.param_groups:
      g["lr"] = nanogpt_lr(it, steps)
    loss = loss_of(x, y)
    x, y = get_batch("train")  # nanoGPT fetches the next batch before the backward pass
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if it % LOG_EVERY == 0:
      lossf = loss.item()
      print(f"iter {it}: loss {lossf:.4f}", file=sys.stderr, flush=True)
    if first_step is None:
      first_step = time.perf_counter() - T0
  loop = time.perf_counter() - t_loop
  from lmos_jax.train.wallclock import process_age  # seconds the interpreter ran before T0,
  before_t0 = max(process_age() - (time.perf_counter() - T0), 0.0)  # as lmos train counts
  print(json.dumps({"first_step_s": first_step + before_t0, "val_loss": last["val"],
                    "train_loss": last["train"], "eval_s": spent["eval"],
                    "checkpoint_s": spent["checkpoint"],
                    "steps_s": loop - spent["eval"] - spent["checkpoint"],
                    "torch_threads": torch.get_num_threads()}), flush=True)
  return 0


def lmos_results(log: Path, workdir: Path) -> dict:
  """First-step time and wall breakdown from `lmos train`'s output, final val from metrics."""
  text = log.read_text(errors="replace")
  first = re.search(r"first step done ([\d.]+) s after start", text)
  wall = re.search(r"lmos train: wall ([\d.]+) s = (.*)", text)
  evals = [json.loads(line)["eval_loss"] for line in
           (workdir / "metrics.jsonl").read_text().splitlines() if '"eval_loss"' in line]
  return {"first_step_s": float(first.group(1)) if first else float("nan"),
          "breakdown": wall.group(2).strip() if wall else "",
          "val_loss": evals[-1] if evals else float("nan")}


def run_lmos(out: Path, tag: str, cache: Path, args) -> dict | None:
  workdir = out / f"lmos_{tag}"
  log = out / f"lmos_{tag}.log"
  cmd = [*lmos_command(), "train", "--config", str(ROOT / "configs/shakespeare_char.py") + ":cpu",
         "--workdir", str(workdir), f"--config.data.path={args.data}",
         f"--config.train.steps={args.steps}", f"--config.train.precision={args.precision}"]
  os.environ["LMOS_COMPILE_CACHE"] = str(cache)
  wall, rc = timed(cmd, log)
  if rc != 0:
    fail("bench_train_run", f"lmos train ({tag})", log, rc)
    return None
  return {"impl": f"lmos train, {tag} compile cache", "wall_s": wall, **lmos_results(log, workdir)}


def run_peer(out: Path, k: int, args) -> dict | None:
  log = out / f"nanogpt_{k}.log"
  ckpt = out / f"nanogpt_{k}"
  ckpt.mkdir(exist_ok=True)
  cmd = [sys.executable, __file__, "--peer-worker", "--data", args.data,
         "--steps", str(args.steps), "--out", str(ckpt)]
  with open(log, "w") as err:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
  if proc.returncode != 0:
    fail("bench_train_run", "the nanoGPT worker", log, proc.returncode)
    return None
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  breakdown = (f"steps {res['steps_s']:.1f} + eval {res['eval_s']:.1f} + checkpoint "
               f"{res['checkpoint_s']:.1f} ({res['torch_threads']} torch threads)")
  return {"impl": "nanoGPT train.py loop (PyTorch eager)", "wall_s": wall,
          "first_step_s": res["first_step_s"], "breakdown": breakdown,
          "val_loss": res["val_loss"]}


def main(argv=None) -> int:
  from lmos_jax.config.datadir import data_file
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--repeats", type=int, default=1, help="cold/warm/nanoGPT rounds")
  ap.add_argument("--data", default=str(data_file("tinyshakespeare.txt")))
  ap.add_argument("--out", default="runs/bench_train_run")
  ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16_matmul"),
                  help="lmos's train.precision (auto: bf16_matmul on CPUs with bf16 dot "
                       "instructions, else fp32; bf16_matmul: Dense matmuls on bf16 operands, "
                       "float32 accumulation)")
  ap.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.peer_worker:
    return peer_worker(args.data, args.steps, Path(args.out))
  if not Path(args.data).is_file():
    print(f"bench_train_run: --data {args.data}: no such file (set LMOS_DATA_DIR or --data)",
          file=sys.stderr)
    return 2
  out = Path(args.out).resolve()
  if out.exists() and any(out.iterdir()):
    print(f"bench_train_run: --out {out} is not empty; give a new directory", file=sys.stderr)
    return 2
  out.mkdir(parents=True, exist_ok=True)
  print(json.dumps(machine()), flush=True)
  rows: dict[str, list[dict]] = {}
  for k in range(args.repeats):
    cache = Path(tempfile.mkdtemp(prefix="lmos_cc_", dir=out))
    for tag in ("cold", "warm"):
      r = run_lmos(out, f"{tag}{k}", cache, args)
      if r is None:
        return 1
      r["impl"] = f"lmos train, {tag} compile cache"
      rows.setdefault(r["impl"], []).append(r)
      print(f"[{k + 1}/{args.repeats}] {r['impl']}: wall {r['wall_s']:.1f} s, first step "
            f"{r['first_step_s']:.1f} s, val {r['val_loss']:.4f}; {r['breakdown']}", flush=True)
    r = run_peer(out, k, args)
    if r is None:
      return 1
    rows.setdefault(r["impl"], []).append(r)
    print(f"[{k + 1}/{args.repeats}] {r['impl']}: wall {r['wall_s']:.1f} s, first step "
          f"{r['first_step_s']:.1f} s, val {r['val_loss']:.4f}; {r['breakdown']}", flush=True)
  med = {impl: {key: statistics.median(r[key] for r in rs)
                for key in ("wall_s", "first_step_s", "val_loss")} for impl, rs in rows.items()}
  print(f"\n{args.steps} steps, lmos train.precision={args.precision}, median of "
        f"{args.repeats}:\n")
  print("| impl | wall s | first step after s | val loss |\n|---|---|---|---|")
  for impl, m in med.items():
    print(f"| {impl} | {m['wall_s']:.1f} | {m['first_step_s']:.1f} | {m['val_loss']:.4f} |")
  peer = med["nanoGPT train.py loop (PyTorch eager)"]
  cold, warm = med["lmos train, cold compile cache"], med["lmos train, warm compile cache"]
  print(f"\nwall, lmos / nanoGPT: cold {cold['wall_s'] / peer['wall_s']:.2f}x, warm "
        f"{warm['wall_s'] / peer['wall_s']:.2f}x (below 1: lmos finishes sooner)")
  print(f"start-up to the first step, warm / cold: "
        f"{warm['first_step_s'] / cold['first_step_s']:.2f}")
  (out / "bench_train_run.json").write_text(json.dumps({"rows": rows, "median": med}, indent=1))
  print(f"results: {out / 'bench_train_run.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
