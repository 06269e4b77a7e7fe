"""`lmos compress --method M --out DIR`: one compressed model, written as a workdir.

The output is a run like any other (config.json, tokenizer.json, labels.json for a
classifier) whose weights are `params.safetensors` as they are stored: int8/int4 codes
(lmos_jax.models.quantized.QArray, multiplied as codes), pruned kernels as nonzeros + a
bitmask. `lmos generate`, `lmos predict`, `lmos serve` and `lmos convert --to-hf` (dense,
pruned and trimmed models) load it through lmos_jax.workdir like a trained run; a trimmed or
distilled model's config.json records its real number of layers. A classifier trained with
LoRA or AdaLoRA is compressed with its updates folded into the kernels (the new run is a
full model). The source run is never written to; an existing --out run is refused.

Methods (M):
  int8                   weight-only, one scale per output channel
  int4[:group=G]         weight-only, one scale per G inputs (default 32; 0 per channel)
  bf16                   Dense kernels stored as bfloat16, multiplied as bf16 operands with
                         float32 accumulation (on AVX512-BF16 CPUs the fastest matmul XLA
                         has: the served MiniLM classifier answered 1.33-1.37x the float32
                         model's requests/s)
  prune:alpha=A          W * (|W| >= A * max|W|) per Dense kernel
  prune:sparsity=S       the smallest S of each Dense kernel's weights set to zero
  nm:N:M                 N nonzeros in every M consecutive inputs (2:4 by default)
  trim:layers=N          language models: keep N layers, dropping the block of consecutive
                         layers whose input and output hidden states are closest in angle
  distill:layers=N[,steps=S][,kd=W][,temp=T]
                         language models: a student of N evenly spaced teacher layers,
                         trained S steps (default 300) on the run's data against the teacher:
                         loss W * KL(teacher || student) at temperature T + (1 - W) * the
                         data's cross-entropy (default W 0.5, T 2). A draft for speculative
                         decoding is judged by how often its argmax is the teacher's, which
                         kd=1,temp=1 trains for directly.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lmos_jax.compress.kernels import kernel_layouts
from lmos_jax.compress.prune import (alpha_max_masks, apply_masks, layerwise_masks, nm_masks,
                                      total_sparsity)
from lmos_jax.compress.quantize import bf16_kernels, param_bytes, quantize_params
from lmos_jax.compress.store import save_params
from lmos_jax.compress.trim import drop_layers, least_important_block
from lmos_jax.errors import UserError
from lmos_jax.models.quantized import is_qarray
from lmos_jax.workdir import (COMPRESSED_PARAMS, existing_run_files, label_names, read_config,
                              read_tokenizer, workdir_params, write_config, write_labels,
                              write_tokenizer)

LM_ONLY = ("trim", "distill")


@dataclasses.dataclass(frozen=True)
class Method:
  """A parsed --method: its kind and numeric options."""

  kind: str  # int8 | int4 | bf16 | prune | nm | trim | distill
  options: dict

  def describe(self) -> str:
    if self.kind == "nm":
      return f"nm:{self.options['n']}:{self.options['m']}"
    opts = ",".join(f"{k}={v:g}" for k, v in self.options.items())
    return f"{self.kind}:{opts}" if opts else self.kind


# kind -> (the sets of required options, one of which must be given exactly; defaults)
METHOD_OPTIONS = {"int8": ([set()], {}), "int4": ([set()], {"group": 32}), "bf16": ([set()], {}),
                  "prune": ([{"alpha"}, {"sparsity"}], {}), "trim": ([{"layers"}], {}),
                  "distill": ([{"layers"}], {"steps": 300, "kd": 0.5, "temp": 2.0})}
METHOD_FORMS = ("int8, int4[:group=G], bf16, prune:alpha=A, prune:sparsity=S, nm:N:M, "
                "trim:layers=N, distill:layers=N[,steps=S][,kd=W][,temp=T]")


def _in_range(key: str, v: float) -> bool:
  if key in ("alpha", "sparsity"):
    return 0 < v < 1
  if key == "kd":
    return 0 <= v <= 1
  if key == "temp":
    return v > 0
  return v == int(v) and v >= (0 if key == "group" else 1)


def parse_method(spec: str) -> Method:
  """--method text -> Method; a bad spec is a UserError naming the accepted forms."""
  kind, _, rest = spec.strip().partition(":")
  bad = UserError(f"--method {spec!r}: expected one of {METHOD_FORMS} (alpha and sparsity "
                  "in (0, 1); kd in [0, 1]; temp > 0; group >= 0, layers and steps >= 1, "
                  "whole numbers)")
  try:
    if kind == "nm":
      n, m = (int(x) for x in (rest or "2:4").split(":"))
      if not 0 < n < m:
        raise bad
      return Method("nm", {"n": n, "m": m})
    opts = {k.strip(): float(v) for k, _, v in
            (part.partition("=") for part in filter(None, rest.split(",")))}
  except ValueError:
    raise bad from None
  if kind not in METHOD_OPTIONS:
    raise bad
  required, defaults = METHOD_OPTIONS[kind]
  if set(opts) - set(defaults) not in required or not all(
      _in_range(k, v) for k, v in opts.items()):
    raise bad
  return Method(kind, {**opts, **{k: v for k, v in defaults.items() if k not in opts}})


def quantized(graphdef, params: dict, m: Method) -> tuple[dict, str]:
  """Weight-only int8/int4 codes of the Dense kernels (and the tied head) and a note."""
  bits, group = (8, 0) if m.kind == "int8" else (4, int(m.options["group"]))
  try:
    q = quantize_params(graphdef, params, bits, group, tied_embedding=True)
  except ValueError as e:
    raise UserError(f"--method {m.describe()}: {e}") from None
  head = ", int8 tied LM head" if is_qarray(q.get("embed")) else ""
  return q, f"weight-only int{bits}, {'per channel' if group == 0 else f'groups of {group}'}{head}"


def pruning_masks(params: dict, layouts, m: Method) -> dict:
  """The keep-masks of a prune or nm method over the Dense kernels of `layouts`."""
  if m.kind == "nm":
    return nm_masks(params, layouts, m.options["n"], m.options["m"])
  if "alpha" in m.options:
    return alpha_max_masks(params, layouts, m.options["alpha"])
  return layerwise_masks(params, layouts, m.options["sparsity"])


def _pruned(graphdef, params: dict, m: Method) -> tuple[dict, str]:
  layouts = kernel_layouts(graphdef, params)
  pruned = jax.device_get(apply_masks(params, pruning_masks(params, layouts, m)))
  return pruned, f"kernel sparsity {total_sparsity(pruned, layouts):.4f}"


def eval_data_config(cfg, data_path: str | None):
  """The run's config with `--data PATH` (if given) as its only text source: a text/files
  source keeps its kind and format, anything else becomes whole-file text."""
  cfg = cfg.copy_and_resolve_references()
  if data_path:
    d = cfg.data
    d.source = d.source if d.source in ("text", "files") else "text"
    d.path, d.val_path, d.mixture, d.streaming = data_path, "", (), False
  return cfg


def _lm_data(cfg, tok, data_path: str | None):
  from lmos_jax.data.build import build_data
  try:
    return build_data(eval_data_config(cfg, data_path), tokenizer=tok)
  except (ValueError, FileNotFoundError) as e:
    raise UserError(f"{'--data ' + data_path if data_path else 'the run data block'}: {e}"
                    ) from None


def fewer_layers(graphdef, params: dict, m: Method, data, seed: int) -> tuple[Any, dict, str]:
  """A model of `layers` blocks: the contiguous block whose removal changes the hidden
  states least dropped (trim), or evenly spread teacher layers trained on the teacher's
  logits (distill); with a note saying which."""
  n = nnx.merge(graphdef, params).cfg.num_layers
  keep = int(m.options["layers"])
  if keep >= n:
    raise UserError(f"--method {m.describe()}: the model has {n} layers; keep fewer")
  if m.kind == "trim":
    calib = jnp.asarray(data.train_batch(0)["inputs"])
    start, dists = least_important_block(graphdef, params, calib, n - keep)
    gd, p = drop_layers(graphdef, params, range(start, start + n - keep))
    return gd, jax.device_get(p), (f"dropped layers {start}..{start + n - keep - 1} of {n} "
                                   f"(angular distances {[round(float(d), 3) for d in dists]})")
  from lmos_jax.compress.distill import distill_loss
  from lmos_jax.train.heal import finetune
  kept = sorted({round(i * (n - 1) / max(keep - 1, 1)) for i in range(keep)})
  sgd, sparams = drop_layers(graphdef, params, [i for i in range(n) if i not in kept])
  teacher = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))

  def with_teacher(b):
    return {**b, "teacher_logits": teacher(params, b["inputs"])}
  steps = int(m.options["steps"])
  loss_fn = distill_loss(m.options["temp"], m.options["kd"])
  sparams, losses = finetune(sgd, sparams, data, steps, lr=1e-3, loss_fn=loss_fn,
                             batch_fn=with_teacher, seed=seed)
  return sgd, jax.device_get(sparams), (f"student of teacher layers {kept}, {steps} steps, "
                                        f"final train loss {losses[-1]:.3f}")


def _source(workdir: str):
  """(config, tokenizer, model graph, dense host params) of the run to compress."""
  from lmos_jax.workdir import check_params_fit, model_layout
  cfg = read_config(workdir)
  if cfg.task not in ("lm", "cls"):
    raise UserError(f"--workdir {workdir}: task {cfg.task!r}; --method compresses language "
                    "models (task lm) and classifiers (task cls)")
  foldable = cfg.task == "cls" and cfg.peft.method in ("lora", "adalora")
  if cfg.peft.method != "full" and not foldable:
    raise UserError(f"--workdir {workdir}: peft.method={cfg.peft.method} on a {cfg.task!r} "
                    "run; compress a fully finetuned run, or a classifier trained with LoRA "
                    "or AdaLoRA (its updates are folded into the kernels)")
  tok = read_tokenizer(workdir)
  graphdef, abstract = model_layout(cfg, tok.vocab_size)
  if foldable:
    from lmos_jax.inference.predict import classifier_params
    from lmos_jax.peft.methods import merged_model
    graphdef, params = merged_model(graphdef, classifier_params(cfg, Path(workdir), abstract))
    cfg = cfg.copy_and_resolve_references()
    cfg.peft.method = "full"
    return cfg, tok, graphdef, jax.device_get(params)
  params = workdir_params(workdir)
  check_params_fit(abstract, params, f"--workdir {workdir}")
  return cfg, tok, graphdef, params


def compress_to_workdir(workdir: str, spec: str, out: str, data_path: str | None = None,
                        seed: int = 0) -> dict:
  """Compresses the run in `workdir` by `spec` into the new run `out`; returns its record."""
  m = parse_method(spec)
  out_dir = Path(out).absolute()
  if existing_run_files(out_dir):
    raise UserError(f"--out {out_dir} already holds {', '.join(existing_run_files(out_dir))}; "
                    "pick a new directory (a run is never overwritten)")
  if Path(workdir).absolute() == out_dir:
    raise UserError("--out must differ from --workdir (the source run is kept as it is)")
  t0 = time.perf_counter()
  cfg, tok, graphdef, params = _source(workdir)
  if m.kind in LM_ONLY and cfg.task != "lm":
    raise UserError(f"--method {m.kind}: for language-model runs (task lm); {workdir} is a "
                    f"{cfg.task!r} run: use int8, int4, bf16, prune or nm")
  new_cfg = cfg.copy_and_resolve_references()
  if m.kind in ("int8", "int4"):
    stored, note = quantized(graphdef, params, m)
  elif m.kind == "bf16":
    stored, note = bf16_kernels(graphdef, params), "Dense kernels in bfloat16"
  elif m.kind in ("prune", "nm"):
    stored, note = _pruned(graphdef, params, m)
  else:
    data = _lm_data(cfg, tok, data_path)
    _, stored, note = fewer_layers(graphdef, params, m, data, seed)
    new_cfg.model.num_layers = int(m.options["layers"])
  record = {"method": m.describe(), "source": str(Path(workdir).absolute()), "note": note,
            "weight_bytes": param_bytes(stored), "source_weight_bytes": param_bytes(params)}
  out_dir.mkdir(parents=True, exist_ok=True)
  size = save_params(stored, out_dir / COMPRESSED_PARAMS, sparse=m.kind in ("prune", "nm"),
                     extra=record)
  write_config(out_dir, new_cfg)
  write_tokenizer(out_dir, tok)
  if cfg.task == "cls":
    write_labels(out_dir, label_names(workdir))
  record.update(bytes_on_disk=size, seconds=round(time.perf_counter() - t0, 1))
  return record

