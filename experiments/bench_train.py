"""lmos_jax vs a PyTorch peer at nanoGPT's two shakespeare-char shapes, in one run.

Both sides train the identical model (GPT-2 block: learned positions, pre-LN with bias,
tanh-GELU MLP 4x, tied embeddings, no dropout) with the identical optimizer (AdamW,
b1=0.9, b2=0.99, eps=1e-8, weight decay 0.1 on matmul weights only, global-norm clip 1.0,
the same warmup-cosine LR evaluated by the same optax schedule) on the identical batches.
The peers are nanoGPT's own model (written out in this file: fused qkv, PyTorch's
`scaled_dot_product_attention`, fused/foreach AdamW), eager or `torch.compile`d, and
`transformers`' GPT2LMHeadModel with torch AdamW, eager and (when it works) `torch.compile`. Each side runs in its own worker process (their thread pools interfere
when they share one); windows of steps alternate between the workers so a change in machine
load hits all of them; step times are medians over windows. Model FLOP/s use the PaLM convention
(6 x matmul params + attention per token) and are compared with the f32 matmul peak
measured in the same run. The lmos worker uses `lmos train`'s host set-up (one XLA device per
core, `mesh.cpu_allocator=auto`); `--peer-allocator retain` gives the PyTorch workers the same
retained malloc, for a like-for-like comparison (the default allocator costs every framework
page faults per step, more so when the other workers hold memory).

  python3 experiments/bench_train.py                      # both shapes, nanogpt + eager + compile
  python3 experiments/bench_train.py --peer-allocator retain
  python3 experiments/bench_train.py --shapes small --peers eager
  python3 experiments/bench_train.py --precision fp32 --peers nanogpt,nanogpt_bf16
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from lmos_jax.config.datadir import data_file

ROOT = Path(__file__).resolve().parents[1]
DATA = data_file("tinyshakespeare.txt")  # --data overrides; $LMOS_DATA_DIR or data/

# name -> (layers, heads, d_model, block, batch, windows, steps per window, warmup steps).
# Baby: 3 warm-up steps and 5 windows, because with malloc retained lmos's heap grows to its
# high-water mark over the first few calls (a call's temporaries, 2-3 GB a device, can be
# allocated before the previous call's are freed), and each growth page-faults ~2 GB inside
# a step (~5 s on a 2-core VM); the median of 5 windows stays clear of a late one.
SHAPES = {
    "small": (4, 4, 128, 64, 12, 5, 60, 5),
    "baby": (6, 6, 384, 256, 64, 5, 2, 3),
}


def lmos_config(shape: str, total_steps: int, data_path: str, precision: str = "auto"):
  from lmos_jax.config.loading import load_config_file
  arg = "cpu" if shape == "small" else "baby"
  cfg = load_config_file(str(ROOT / "configs" / "shakespeare_char.py") + ":" + arg)
  layers, heads, d, block, batch, *_ = SHAPES[shape]
  cfg.model.num_layers, cfg.model.num_heads, cfg.model.d_model = layers, heads, d
  cfg.model.max_seq_len = cfg.data.seq_len = block
  cfg.model.use_bias, cfg.model.dropout = True, 0.0  # GPT2LMHeadModel always has biases
  cfg.train.batch_size, cfg.train.steps = batch, total_steps
  cfg.train.warmup_steps = min(cfg.train.warmup_steps, max(total_steps // 10, 1))
  cfg.train.precision = precision
  cfg.data.path = data_path
  return cfg


class LmosSide:
  """The real lmos pipeline: build_run -> sharded init -> jitted, donated train step."""

  def __init__(self, cfg):
    from lmos_jax.train.step import jit_train_step, jit_eval_step
    from lmos_jax.train.trainer import build_run
    self.run = build_run(cfg)  # every device this process shows (see --cpu-devices)
    self.per_call = cfg.train.steps_per_call
    self.policy = self.run.step_cfg.policy.name  # what `auto` chose on this host
    self.name = (f"lmos_jax ({len(jax.devices())} XLA device{'s' * (len(jax.devices()) > 1)}"
                 + (f", {self.per_call} steps per call" if self.per_call > 1 else "")
                 + ("" if self.policy == "fp32" else f", {self.policy}") + ")")
    with jax.set_mesh(self.run.mesh):
      self.state = jax.jit(self.run.init_fn, out_shardings=self.run.shardings)(
          jax.random.PRNGKey(cfg.seed))
    ndims = {"inputs": 2, "targets": 2}
    self.step_fn = jit_train_step(self.run.step_cfg, self.run.shardings, self.run.mesh, ndims,
                                  steps_per_call=self.per_call)
    self.eval_fn = jit_eval_step(self.run.step_cfg, self.run.shardings["params"],
                                 self.run.mesh, ndims)
    self.losses: list = []

  def steps(self, batches: list[dict]) -> None:
    from lmos_jax.train.trainer import next_call_batch
    k = self.per_call
    assert len(batches) % k == 0, f"{len(batches)} steps: not a multiple of steps_per_call={k}"
    with jax.set_mesh(self.run.mesh):
      for i in range(0, len(batches), k):
        batch = next_call_batch(self.run, iter(batches[i:i + k]), k)
        self.state, m = self.step_fn(self.state, batch)
        self.losses.append(m["loss"])
        if len(self.losses) > 1:  # two calls in flight at most, as in `lmos train`
          jax.block_until_ready(self.losses[-2])
      jax.block_until_ready(self.state)

  def loss_history(self) -> list[float]:
    return [float(x) for x in np.ravel(jax.device_get(self.losses))]

  def eval_loss(self, batches: list[dict]) -> float:
    from lmos_jax.train.trainer import global_batch
    tot = w = 0.0
    with jax.set_mesh(self.run.mesh):
      for b in batches:
        out = jax.device_get(self.eval_fn(self.state["params"], global_batch(self.run, b)))
        tot, w = tot + float(out["loss_sum"]), w + float(out["weight"])
    return tot / w


class TorchSide:
  """GPT2LMHeadModel + torch.optim.AdamW, same hyperparameters and LR values per step."""

  def __init__(self, cfg, vocab: int, compiled: bool):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from lmos_jax.train.optim import make_schedule
    torch.manual_seed(cfg.seed)
    m, t = cfg.model, cfg.train
    gcfg = GPT2Config(vocab_size=vocab, n_positions=m.max_seq_len, n_embd=m.d_model,
                      n_layer=m.num_layers, n_head=m.num_heads, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                      layer_norm_epsilon=m.norm_eps, initializer_range=m.init_std,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    self.torch = torch
    self.model = GPT2LMHeadModel(gcfg).train()  # sdpa attention by default
    decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and "wte" not in n
             and "wpe" not in n]
    no_decay = [p for n, p in self.model.named_parameters() if not (p.dim() >= 2 and
                "wte" not in n and "wpe" not in n)]
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=t.lr, betas=(t.b1, t.b2), eps=t.eps)
    self.schedule = make_schedule(t)
    self.clip = t.grad_clip
    self.name = "torch.compile" if compiled else "torch eager"
    fwd = self._loss
    self.loss_fn = torch.compile(fwd) if compiled else fwd
    self.losses: list[float] = []
    self.step_count = 0

  def _loss(self, x, y):
    logits = self.model(input_ids=x).logits
    return self.torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

  def steps(self, batches: list[dict]) -> None:
    torch = self.torch
    for b in batches:
      lr = float(self.schedule(self.step_count))
      for g in self.opt.param_groups:
        g["lr"] = lr
      x, y = torch.from_numpy(b["inputs"]).long(), torch.from_numpy(b["targets"]).long()
      loss = self.loss_fn(x, y)
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
      self.opt.step()
      self.losses.append(loss.detach())
      self.step_count += 1

  def loss_history(self) -> list[float]:
    return [float(x) for x in self.losses]

  def eval_loss(self, batches: list[dict]) -> float:
    torch = self.torch
    with torch.no_grad():
      vals = [float(self._loss(torch.from_numpy(b["inputs"]).long(),
                               torch.from_numpy(b["targets"]).long())) for b in batches]
    return float(np.mean(vals))


def nanogpt_model(torch, vocab: int, layers: int, heads: int, d: int, block: int,
                  init_std: float, eps: float, bias: bool = True):
  """nanoGPT's model.py GPT, written out here: pre-LN blocks (biases in the Linear and
  LayerNorm layers unless `bias` is False, nanoGPT's `bias` setting), one fused qkv
  Linear, `scaled_dot_product_attention(is_causal=True)`, a 4x MLP, tied token embedding
  and LM head, N(0, 0.02) init with the residual projections scaled by 1/sqrt(2 L). Its GELU
  is the tanh form, as this benchmark's lmos model has it (nanoGPT's own uses erf; the cost
  is the same)."""
  nn, F = torch.nn, torch.nn.functional

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln_1 = nn.LayerNorm(d, eps=eps, bias=bias)
      self.ln_2 = nn.LayerNorm(d, eps=eps, bias=bias)
      self.c_attn, self.attn_proj = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
      self.c_fc = nn.Linear(d, 4 * d, bias=bias)
      self.mlp_proj = nn.Linear(4 * d, d, bias=bias)

    def forward(self, x):
      b, t, _ = x.shape
      q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
      q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, d))
      return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
      self.h = nn.ModuleList(Block() for _ in range(layers))
      self.ln_f = nn.LayerNorm(d, eps=eps, bias=bias)
      for name, prm in self.named_parameters():
        if name.endswith("bias"):
          nn.init.zeros_(prm)
        elif prm.dim() >= 2:
          std = init_std / math.sqrt(2 * layers) if name.endswith("proj.weight") else init_std
          nn.init.normal_(prm, 0.0, std)

    def forward(self, idx):
      pos = torch.arange(idx.shape[1], device=idx.device)
      x = self.wte(idx) + self.wpe(pos)
      for blk in self.h:
        x = blk(x)
      return self.ln_f(x) @ self.wte.weight.T  # tied head

  return GPT()


class NanoGPTSide:
  """nanoGPT's model (above) with torch AdamW (foreach, nanoGPT's CPU choice; fused where
  torch has it for CPU), the same hyperparameters and LR values per step as lmos."""

  def __init__(self, cfg, vocab: int, compiled: bool, bf16: bool = False):
    import torch
    from lmos_jax.train.optim import make_schedule
    torch.manual_seed(cfg.seed)
    m, t = cfg.model, cfg.train
    self.torch, self.bf16 = torch, bf16
    self.model = nanogpt_model(torch, vocab, m.num_layers, m.num_heads, m.d_model,
                               m.max_seq_len, m.init_std, m.norm_eps).train()
    params = list(self.model.named_parameters())
    decay = [p for n, p in params if p.dim() >= 2 and not n.startswith(("wte", "wpe"))]
    rest = [p for n, p in params if not (p.dim() >= 2 and not n.startswith(("wte", "wpe")))]
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    try:  # fused AdamW on CPU exists in recent torch builds; else foreach
      self.opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.b1, t.b2), eps=t.eps, fused=True)
      kind = "fused"
    except (RuntimeError, TypeError):
      self.opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.b1, t.b2), eps=t.eps,
                                   foreach=True)
      kind = "foreach"
    self.schedule = make_schedule(t)
    self.clip = t.grad_clip
    self.name = (f"nanoGPT model, torch {'compile' if compiled else 'eager'} ({kind} AdamW"
                 + (", bf16 autocast)" if bf16 else ")"))
    self.loss_fn = torch.compile(self._loss) if compiled else self._loss
    self.losses: list = []
    self.step_count = 0

  def _loss(self, x, y):
    # bf16: PyTorch's CPU autocast, matmuls on bf16 operands (what lmos's bf16_matmul does)
    with self.torch.autocast("cpu", dtype=self.torch.bfloat16, enabled=self.bf16):
      logits = self.model(x)
    return self.torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())

  steps = TorchSide.steps
  loss_history = TorchSide.loss_history
  eval_loss = TorchSide.eval_loss


def matmul_peak() -> float:
  """f32 matmul FLOP/s of this host through XLA (2048^2, best of 3 probes)."""
  from lmos_jax.train.metrics import measure_cpu_peak
  return measure_cpu_peak(n=2048, iters=6, repeats=3)


def serve_side(shape: str, side: str, data_path: str, windows: int, per_window: int,
               retained: bool, precision: str = "auto") -> int:
  """Worker process for one side: warm up, then run the window the parent names, report.

  Each framework gets its own process so their thread pools never meet: in one process,
  torch's OpenMP workers slowed the JAX side by 20-30% here.
  """
  import json
  layers, heads, d, block, batch, def_windows, def_per_window, warm = SHAPES[shape]
  windows, per_window = windows or def_windows, per_window or def_per_window
  total = warm + windows * per_window
  cfg = lmos_config(shape, total, data_path, precision)
  if side == "lmos":
    runner = LmosSide(cfg)
    data = runner.run.data
  else:
    from lmos_jax.train.trainer import build_run
    data = build_run(cfg, jax.devices()[:1]).data  # the identical batches, no JAX compile
    if side.startswith("nanogpt"):
      runner = NanoGPTSide(cfg, data.tokenizer.vocab_size, compiled=side.endswith("compile"),
                           bf16=side == "nanogpt_bf16")
    else:
      runner = TorchSide(cfg, data.tokenizer.vocab_size, compiled=side.endswith("compile"))
  batches = [data.train_batch(s) for s in range(total)]
  runner.steps(batches[:warm])  # compile / warm up before timing
  ready = {"ready": runner.name + (" [malloc retained]" if retained else "")}
  if side == "lmos":  # the model's FLOPs per token, for every side's model FLOP/s
    from flax import nnx
    from lmos_jax.train.metrics import flops_per_token
    run = runner.run
    model = nnx.eval_shape(lambda: nnx.merge(run.graphdef, run.abstract_state["params"]))
    ready["flops_per_token"] = flops_per_token(model.cfg, block)
  print(json.dumps(ready), flush=True)
  for line in sys.stdin:
    if line.strip() == "done":
      break
    w = int(line)
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    runner.steps(batches[warm + w * per_window: warm + (w + 1) * per_window])
    seconds, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": seconds, "faults": after.ru_minflt - before.ru_minflt,
                      "sys": after.ru_stime - before.ru_stime}), flush=True)
  hist = runner.loss_history()
  print(json.dumps({"losses": hist, "val_loss": runner.eval_loss(data.val_batches()[:4])}),
        flush=True)
  return 0


def bench_shape(shape: str, sides: list[str], args) -> list[dict]:
  """Alternates timed windows between one worker process per side; medians per side."""
  import json
  import subprocess
  layers, heads, d, block, batch, def_windows, def_per_window, warm = SHAPES[shape]
  windows, per_window = args.windows or def_windows, args.per_window or def_per_window
  procs, ready = {}, {}
  for side in sides:
    cmd = [sys.executable, __file__, "--shapes", shape, "--side", side, "--data", args.data,
           "--windows", str(windows), "--per-window", str(per_window),
           "--cpu-devices", str(args.cpu_devices), "--peer-allocator", args.peer_allocator,
           "--precision", args.precision]
    # Compile in the torch.compile worker itself: inductor's pool of compile processes would
    # otherwise stay alive beside the timed windows.
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1")
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()  # workers start one at a time: compiles don't overlap
    if not line:
      print(f"[{shape}] {side} failed to start (its error is above)", flush=True)
      continue
    procs[side], ready[side] = p, json.loads(line)
  times: dict[str, list[float]] = {s: [] for s in procs}
  for w in range(windows):
    said = []
    for side, p in procs.items():
      p.stdin.write(f"{w}\n")
      p.stdin.flush()
      out = json.loads(p.stdout.readline())
      times[side].append(out["seconds"] / per_window)
      said.append(f"{side} {1e3 * times[side][-1]:.1f} ({out['faults']:,} page faults, "
                  f"{out['sys']:.1f} s system)")
    # page faults show where a step's time went to growing or re-faulting memory
    print(f"[{shape}] window {w + 1}/{windows}, ms per step: " + ", ".join(said), flush=True)
  fpt = ready.get("lmos", {}).get("flops_per_token", float("nan"))
  tokens = batch * block
  rows = []
  for side, p in procs.items():
    p.stdin.write("done\n")
    p.stdin.flush()
    out = json.loads(p.stdout.readline())
    p.wait()
    hist = out["losses"]
    tail = max(len(hist) // 10, 1)
    step_s = statistics.median(times[side])
    rows.append({"shape": shape, "impl": ready[side]["ready"], "step_ms": 1e3 * step_s,
                 "spread": (max(times[side]) - min(times[side])) / step_s,
                 "tok_s": tokens / step_s, "flops": fpt * tokens / step_s,
                 "train_loss": float(np.mean(hist[-tail:])), "val_loss": out["val_loss"],
                 "steps": len(hist)})
  return rows


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default="small,baby")
  ap.add_argument("--peers", default="nanogpt,eager,compile",
                  help="comma list of nanogpt, nanogpt_compile (nanoGPT's model in torch), "
                       "nanogpt_bf16 (the same under bf16 autocast), eager, compile "
                       "(transformers' GPT2LMHeadModel)")
  ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16_matmul"),
                  help="lmos's train.precision (auto: as `lmos train` picks it, bf16_matmul on "
                       "CPUs with bf16 dot instructions; bf16_matmul: Dense matmuls on bf16 "
                       "operands, float32 accumulation)")
  ap.add_argument("--data", default=str(DATA))
  ap.add_argument("--windows", type=int, default=0, help="timed windows (0: per-shape default)")
  ap.add_argument("--per-window", type=int, default=0,
                  help="steps per window (0: default; for lmos a multiple of the config's "
                       "train.steps_per_call, 5 at the small shape)")
  ap.add_argument("--cpu-devices", type=int, default=0,
                  help="XLA CPU devices for lmos (0: lmos's default, one per core; 1: one)")
  ap.add_argument("--peer-allocator", default="system", choices=("system", "retain"),
                  help="malloc policy of the PyTorch workers (retain: what lmos's "
                       "mesh.cpu_allocator=retain does, for a like-for-like check)")
  ap.add_argument("--side", default="", help=argparse.SUPPRESS)  # worker mode (internal)
  args = ap.parse_args(argv)
  from lmos_jax.config.schema import base_config
  from lmos_jax.parallel.host_cpu import split_cpu_host
  from lmos_jax.parallel.host_memory import retain_freed_memory, setup_cpu_allocator
  mesh = base_config().mesh
  mesh.cpu_devices = args.cpu_devices
  batch_gcd = math.gcd(*[SHAPES[s][4] for s in args.shapes.split(",")])
  devices = split_cpu_host(mesh, batch_gcd, 1)  # what `lmos train` does before JAX starts
  retained = False
  if args.side == "lmos":  # and its malloc policy (mesh.cpu_allocator=auto)
    retained = setup_cpu_allocator(lmos_config(args.shapes, 1, args.data), devices or 1)
  elif args.side and args.peer_allocator == "retain":
    retained = retain_freed_memory()
  if args.side:
    return serve_side(args.shapes, args.side, args.data, args.windows, args.per_window,
                      retained, args.precision)
  if not Path(args.data).is_file():
    print(f"--data={args.data!r}: no such file (tinyshakespeare.txt); set LMOS_DATA_DIR to "
          "the folder holding it or pass --data", file=sys.stderr)
    return 2
  peers = [p for p in args.peers.split(",") if p]
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"{len(jax.devices())} device(s), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"load {os.getloadavg()}", flush=True)
  peak0 = matmul_peak()
  rows = []
  for shape in args.shapes.split(","):
    rows += bench_shape(shape, ["lmos", *peers], args)
  peak = statistics.median([peak0, matmul_peak()])
  print(f"\nf32 matmul peak (2048^2, XLA, median of start/end probes): {peak / 1e9:.1f} GFLOP/s;"
        f" load at end {os.getloadavg()}")
  base = "nanoGPT model, torch eager" if "nanogpt" in peers else "torch eager"
  hdr = (f"| shape | impl | steps | step ms (median) | spread | tokens/s | vs {base} | "
         "model GFLOP/s | % of peak | train loss (last 10%) | val loss |")
  print(hdr + "\n|" + "---|" * 11)
  for r in rows:
    ref = next((q for q in rows
                if q["shape"] == r["shape"] and q["impl"].startswith(base)),
               None)
    ratio = f"{r['tok_s'] / ref['tok_s']:.2f}x" if ref else "n/a"
    print(f"| {r['shape']} | {r['impl']} | {r['steps']} | {r['step_ms']:.1f} | "
          f"{100 * r['spread']:.0f}% | {r['tok_s']:,.0f} | {ratio} | {r['flops'] / 1e9:.1f} | "
          f"{100 * r['flops'] / peak:.0f}% | {r['train_loss']:.4f} | {r['val_loss']:.4f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
