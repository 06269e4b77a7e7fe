"""`lmos compress`: make a trained model smaller and show the price in quality and speed.

  lmos compress --workdir DIR --method M --out NEWDIR [--data PATH]
  lmos compress --workdir DIR [--report] [--recipe dense,int8,int4,prune50,nm24,trim,distill]
                [--heal-steps N] [--distill-steps N] [--data PATH] [--out DIR] [--force]

With --method, one compressed model is written as a new run (lmos_jax.inference
.compress_run lists the methods) that generate, predict, serve and convert load. Without it
(or with --report), every recipe is built and compared:

Every variant is saved as it is stored (int8/int4 codes; pruned kernels as nonzeros + a
bitmask) and measured the same way: weights and nonzero weights, bytes on disk, validation
loss and perplexity on the run's validation batches, and decode tokens/s of the compiled
KV-cache decoder on this machine. Writes report.md, report.json and compress.png.

The model, its params and its tokenizer come from the workdir (lmos_jax.workdir); the text
for validation loss and for healing/distillation is the run's own data block (config.json),
or the file given by `--data`, tokenized with the run's tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lmos_jax.errors import ArgumentParser, UserError, existing_dir, number
from lmos_jax.inference.compress_run import (compress_to_workdir, eval_data_config, fewer_layers,
                                             parse_method, pruning_masks, quantized)
from lmos_jax.models.decode import Decoder
from lmos_jax.train.heal import finetune, lora_heal
from lmos_jax.compress.kernels import kernel_layouts
from lmos_jax.compress.prune import (apply_masks, masked_pruning, sparsity_report,
                                      total_sparsity)
from lmos_jax.compress.quantize import count_weights, dequantize_params
from lmos_jax.compress.store import save_params
from lmos_jax.train.losses import lm_loss
from lmos_jax.workdir import COMPRESSED

RECIPES = ("dense", "int8", "int4", "prune50", "nm24", "trim", "distill")


@dataclasses.dataclass(frozen=True)
class Source:
  """What is compressed: the run's config and model graph, and the data (with the run's
  tokenizer) that measures, heals and distills it."""

  cfg: Any
  graphdef: Any
  data: Any


@dataclasses.dataclass
class Variant:
  name: str
  graphdef: Any
  params: Any  # as stored: may hold QArrays
  sparse: bool = False
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Options:
  heal_steps: int = 100
  distill_steps: int = 300
  int4_group: int = 32
  lr: float = 3e-4
  decode_batch: int = 8
  seed: int = 0


def val_loss(graphdef, params, batches: list[dict]) -> float:
  """Token-weighted mean cross-entropy; quantized kernels stay quantized in the step."""
  fn = jax.jit(lambda p, b: lm_loss(nnx.merge(graphdef, p), b, None)[:2])
  tot = wsum = 0.0
  for b in batches:
    s, w = jax.device_get(fn(params, b))
    tot, wsum = tot + float(s), wsum + float(w)
  return tot / max(wsum, 1.0)


def decode_speeds(variants: list[Variant], cache_len: int, batch: int, prompt_id: int,
                  rounds: int = 5) -> dict[str, float]:
  """Generated tokens/s per variant: greedy from a one-token prompt to a full cache.

  All decoders compile first; then `rounds` round-robin passes time each variant once and
  the best pass counts, so load from other processes hits every variant alike.
  """
  prompts = [[prompt_id]] * batch
  decs = {v.name: Decoder(v.graphdef, cache_len)
          for v in variants}
  for v in variants:
    decs[v.name].generate(v.params, prompts, cache_len - 1)  # compile
  best = {v.name: math.inf for v in variants}
  tokens = {}
  for _ in range(rounds):
    for v in variants:
      t0 = time.perf_counter()
      out = decs[v.name].generate(v.params, prompts, cache_len - 1)
      best[v.name] = min(best[v.name], time.perf_counter() - t0)
      tokens[v.name] = sum(len(t) for t in out.tokens)
  return {name: tokens[name] / best[name] for name in best}


def _heal_pruned(run: Source, graphdef, params, masks, opts: Options):
  if opts.heal_steps <= 0:
    return params, ""
  layouts = kernel_layouts(graphdef, params)
  tx = masked_pruning(optax.adamw(opts.lr, weight_decay=0.1), layouts, masks=masks)
  healed, losses = finetune(graphdef, params, run.data, opts.heal_steps, tx=tx,
                            seed=opts.seed)
  return healed, f"healed {opts.heal_steps} steps (masked AdamW), train loss {losses[-1]:.3f}"


def build_variant(name: str, run: Source, params: dict, opts: Options, batches) -> Variant:
  """One compressed model from the dense params (see RECIPES)."""
  gd = run.graphdef
  if name == "dense":
    return Variant(name, gd, params)
  if name in ("int8", "int4"):
    q, note = quantized(gd, params, parse_method(
        "int8" if name == "int8" else f"int4:group={opts.int4_group}"))
    return Variant(name, gd, q, note=note)
  if name in ("prune50", "nm24"):
    layouts = kernel_layouts(gd, params)
    masks = pruning_masks(params, layouts, parse_method(
        "prune:sparsity=0.5" if name == "prune50" else "nm:2:4"))
    pruned = apply_masks(params, masks)
    one_shot = val_loss(gd, pruned, batches)
    healed, note = _heal_pruned(run, gd, pruned, masks, opts)
    kind = "50% layer-wise magnitude" if name == "prune50" else "2:4 magnitude"
    return Variant(name, gd, healed, sparse=True,
                   note=f"{kind}; one-shot val loss {one_shot:.3f}; {note}")
  if name in ("trim", "distill"):
    # one block dropped; a student of half the layers (rounded up) at the --method defaults
    n = nnx.merge(gd, params).cfg.num_layers
    m = parse_method(f"trim:layers={n - 1}" if name == "trim" else
                     f"distill:layers={(n + 1) // 2},steps={opts.distill_steps}")
    sgd, sparams, note = fewer_layers(gd, params, m, run.data, opts.seed)
    if name == "trim":
      note += f"; one-shot val loss {val_loss(sgd, sparams, batches):.3f}"
      if opts.heal_steps > 0:
        sparams, losses = lora_heal(sgd, sparams, run.data, opts.heal_steps, seed=opts.seed)
        note += (f"; healed by {opts.heal_steps} steps of LoRA (rank 8, every Dense, lr 1e-3, "
                 f"lmos_jax.peft) merged back, train loss {losses[-1]:.3f}")
    return Variant(name, sgd, sparams, note=note)
  raise ValueError(f"--recipe: unknown variant {name!r}; expected some of {', '.join(RECIPES)}")


def measure(v: Variant, out_dir: Path, batches) -> dict:
  """Everything but speed (measured for all variants together, see decode_speeds)."""
  size = save_params(v.params, out_dir / f"{v.name}.safetensors", sparse=v.sparse)
  loss = val_loss(v.graphdef, v.params, batches)
  dense = dequantize_params(v.params)
  nonzero = sum(int(jnp.count_nonzero(x)) for x in jax.tree.leaves(dense))
  row = {"variant": v.name, "weights": count_weights(v.params), "nonzero": nonzero,
         "bytes_on_disk": size, "val_loss": loss, "perplexity": math.exp(loss),
         "note": v.note}
  if v.sparse:
    layouts = kernel_layouts(v.graphdef, dense)
    row["kernel_sparsity"] = total_sparsity(dense, layouts)
    row["layer_sparsity"] = {n: round(s, 4) for n, _, s in sparsity_report(dense, layouts)}
  return row


def markdown(rows: list[dict]) -> str:
  head = ("| variant | weights | nonzero | bytes on disk | val loss | perplexity | "
          "decode tok/s |\n|---|---:|---:|---:|---:|---:|---:|")
  lines = [head]
  for r in rows:
    lines.append(f"| {r['variant']} | {r['weights']:,} | {r['nonzero']:,} | "
                 f"{r['bytes_on_disk']:,} | {r['val_loss']:.4f} | {r['perplexity']:.3f} | "
                 f"{r['decode_tok_s']:,.0f} |")
  lines.append("")
  lines += [f"- **{r['variant']}**: {r['note']}" for r in rows if r["note"]]
  for r in rows:
    if "layer_sparsity" in r:
      per = ", ".join(f"{k}={v:.3f}" for k, v in r["layer_sparsity"].items())
      lines.append(f"- {r['variant']} actual kernel sparsity {r['kernel_sparsity']:.4f}; "
                   f"per layer: {per}")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
  for r in rows:
    ax1.scatter(r["bytes_on_disk"] / 1e6, r["val_loss"])
    ax1.annotate(r["variant"], (r["bytes_on_disk"] / 1e6, r["val_loss"]),
                 textcoords="offset points", xytext=(4, 4))
  ax1.set_xlabel("bytes on disk (MB)")
  ax1.set_ylabel("validation loss")
  ax1.set_title("size vs quality")
  names = [r["variant"] for r in rows]
  ax2.bar(names, [r["decode_tok_s"] for r in rows])
  ax2.set_ylabel("decode tokens/s (KV cache, this machine)")
  ax2.set_title("decode speed")
  ax2.tick_params(axis="x", rotation=30)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def load_source(workdir: str, data_path: str | None = None) -> tuple[Source, Any]:
  """(Source, dense params on the host) from a trained language-model workdir."""
  from lmos_jax.data.build import build_data
  from lmos_jax.inference.generate import load_trained

  trained = load_trained(workdir)
  if trained.cfg.task != "lm":
    raise UserError(f"--workdir {workdir} holds task {trained.cfg.task!r}; lmos compress "
                    "measures language-model loss and decoding, so it needs a task 'lm' run")
  cfg = eval_data_config(trained.cfg, data_path)
  try:
    data = build_data(cfg, tokenizer=trained.tokenizer)
  except (ValueError, FileNotFoundError) as e:
    where = f"--data {data_path}" if data_path else f"the data block of {workdir}/config.json"
    raise UserError(f"{where}: {e}") from None
  return Source(cfg, trained.graphdef, data), jax.device_get(trained.params)


def prompt_token(tok) -> int:
  """A one-token prompt for the decode-speed test: a newline, else BOS/EOS, else id 0."""
  ids = tok.encode("\n")
  if len(ids):
    return int(ids[0])
  sp = getattr(tok, "specials", {}) or {}
  return int(sp.get("bos", sp.get("eos", 0)))


def compress(workdir: str, recipes: list[str], out_dir: Path, opts: Options,
             data_path: str | None = None, force: bool = False) -> list[dict]:
  if (out_dir / "report.json").exists() and not force:
    raise UserError(f"{out_dir} already holds a compression report; pass --force to "
                    "overwrite it or --out to write elsewhere")
  run, params = load_source(workdir, data_path)
  batches = run.data.val_batches()
  cache_len = run.cfg.model.max_seq_len
  prompt_id = prompt_token(run.data.tokenizer)
  out_dir.mkdir(parents=True, exist_ok=True)
  rows, variants = [], []
  for name in recipes:
    t0 = time.perf_counter()
    variants.append(build_variant(name, run, params, opts, batches))
    rows.append(measure(variants[-1], out_dir, batches))
    print(f"lmos compress: {name}: val loss {rows[-1]['val_loss']:.4f}, "
          f"{rows[-1]['bytes_on_disk']:,} bytes ({time.perf_counter() - t0:.0f}s)", flush=True)
  speeds = decode_speeds(variants, cache_len, opts.decode_batch, prompt_id)
  for row in rows:
    row["decode_tok_s"] = speeds[row["variant"]]
  (out_dir / "report.json").write_text(json.dumps(rows, indent=2))
  (out_dir / "report.md").write_text(markdown(rows))
  plot(rows, out_dir / "compress.png")
  return rows


def main(argv: list[str]) -> int:
  p = ArgumentParser(prog=argv[0], description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, type=existing_dir("config.json"))
  p.add_argument("--method", default=None,
                 help="write one compressed model as the run --out: int8, int4[:group=G], "
                      "prune:alpha=A, prune:sparsity=S, nm:N:M, trim:layers=N, "
                      "distill:layers=N[,steps=S]")
  p.add_argument("--report", action="store_true",
                 help="compare the --recipe variants in a report (the default without --method)")
  p.add_argument("--recipe", default=",".join(RECIPES),
                 help=f"comma-separated subset of {','.join(RECIPES)}")
  p.add_argument("--out", default=None, help=f"default: WORKDIR/{COMPRESSED}")
  p.add_argument("--force", action="store_true", help="overwrite a report already in --out")
  p.add_argument("--heal-steps", type=number(int, 0), default=Options.heal_steps)
  p.add_argument("--distill-steps", type=number(int, 1), default=Options.distill_steps)
  p.add_argument("--int4-group", type=number(int, 0), default=Options.int4_group,
                 help="int4 group size (0: per output channel)")
  p.add_argument("--decode-batch", type=number(int, 1), default=Options.decode_batch)
  p.add_argument("--data", default=None, metavar="PATH",
                 help="text file(s) to measure validation loss on and to heal/distill with, "
                      "tokenized with the run's tokenizer; default: the run's own data block "
                      "(config.json)")
  a = p.parse_args(argv[1:])
  if a.method is not None:
    if a.report or not a.out:
      p.error("--method writes one model to a new run: give --out NEWDIR (and no --report)")
    return method_main(a)
  recipes = [r.strip() for r in a.recipe.split(",") if r.strip()]
  bad = [r for r in recipes if r not in RECIPES]
  if bad or not recipes:
    p.error(f"--recipe: unknown {bad}; choose from {','.join(RECIPES)}")
  out = Path(a.out) if a.out else Path(a.workdir) / COMPRESSED
  opts = Options(heal_steps=a.heal_steps, distill_steps=a.distill_steps,
                 int4_group=a.int4_group, decode_batch=a.decode_batch)
  try:
    rows = compress(a.workdir, recipes, out, opts, a.data, a.force)
  except UserError as e:
    print(f"lmos compress: {e}", file=sys.stderr)
    return 2
  print(markdown(rows))
  print(f"lmos compress: wrote {out / 'report.md'}, report.json, compress.png", flush=True)
  return 0


def method_main(a) -> int:
  """`lmos compress --method M --out NEWDIR`: the new run, its size and (for a language
  model) validation loss before and after, on the source run's data."""
  try:
    rec = compress_to_workdir(a.workdir, a.method, a.out, a.data)
    line = (f"lmos compress: {rec['method']} -> {a.out}: {rec['note']}; weights "
            f"{rec['source_weight_bytes']:,} -> {rec['weight_bytes']:,} bytes in memory, "
            f"{rec['bytes_on_disk']:,} on disk ({rec['seconds']:.0f}s)")
    print(line, flush=True)
    if read_task(a.workdir) == "lm":
      from lmos_jax.inference.generate import load_trained
      src, params = load_source(a.workdir, a.data)
      new = load_trained(a.out)  # the source's data measures both: built once
      batches = src.data.val_batches()
      print(f"lmos compress: validation loss {val_loss(src.graphdef, params, batches):.4f} "
            f"-> {val_loss(new.graphdef, new.params, batches):.4f}", flush=True)
    else:
      print(f"lmos compress: score it with `lmos predict --workdir {a.out} --input DEV.tsv` "
            "(accuracy and macro-F1 of a labelled file)", flush=True)
  except UserError as e:
    print(f"lmos compress: {e}", file=sys.stderr)
    return 2
  return 0


def read_task(workdir: str) -> str:
  from lmos_jax.workdir import read_config
  return read_config(workdir).task
