"""Loading configs (`path.py[:arg]` with `get_config(arg)`) and validating them early."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import ml_collections

from lmos_jax.config.schema import (CHOICES, MESH_AXES, SPECIAL_SETS, SPEC_FIELDS, base_config,
                                     default_prune_end, default_t_final, special_set)
from lmos_jax.errors import UserError


class ConfigError(UserError, ValueError):
  """A config field is wrong; the message names the field and the fix."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`configs/x.py` or `configs/x.py:arg` -> the ConfigDict its `get_config(arg)` returns.

  Every way the file can fail (missing, a syntax error, an exception while it runs, no
  get_config, something other than a ConfigDict returned) is a ConfigError naming the file.
  """
  path, _, arg = spec.partition(":")
  p = Path(path).expanduser()
  if not p.is_file():
    raise ConfigError(f"--config={spec!r}: no such file {path!r}; give a config .py file "
                      "(e.g. configs/default.py)")
  module_spec = importlib.util.spec_from_file_location(f"lmos_config_{p.stem}", p)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"--config={spec!r}: syntax error at {e.filename}:{e.lineno}: "
                      f"{e.msg}; fix the file") from None
  except Exception as e:  # noqa: BLE001 - the user's file failed: say where, not a traceback
    raise ConfigError(f"--config={spec!r}: running the file raised {_raised(e, p)}") from None
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"--config={spec!r}: the file defines no get_config(arg=None); a "
                      "config file returns its ConfigDict from get_config")
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # noqa: BLE001
    call = f"get_config({arg!r})" if arg else "get_config()"
    raise ConfigError(f"--config={spec!r}: {call} raised {_raised(e, p)}") from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"--config={spec!r}: get_config returned {type(cfg).__name__}, not a "
                      "ConfigDict; start from lmos_jax.config.schema.base_config()")
  return cfg


def _raised(e: Exception, path: Path) -> str:
  """`TypeError: msg (at FILE:LINE)`: the innermost line of the config file that raised."""
  import traceback
  frames = [f for f in traceback.extract_tb(e.__traceback__)
            if Path(f.filename).resolve() == path.resolve()]
  where = f" (at {path}:{frames[-1].lineno})" if frames else ""
  return f"{type(e).__name__}: {e}{where}"


def _check_schema(cfg: Any, schema: Any, prefix: str) -> None:
  """Every key must exist in the schema with a compatible type (ints may fill floats)."""
  for key in cfg.keys():
    name = f"{prefix}{key}"
    if key not in schema:
      close = [k for k in schema.keys() if k.lower().startswith(key[:3].lower())]
      hint = f" (did you mean {', '.join(close)}?)" if close else ""
      raise ConfigError(f"unknown config key {name!r}{hint}; known keys under "
                        f"{prefix.rstrip('.') or 'the top level'}: {', '.join(schema.keys())}")
    value, default = cfg[key], schema[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"config {name!r} must be a block of settings, got {value!r}")
      _check_schema(value, default, name + ".")
      continue
    ok = (default is None or value is None or isinstance(value, type(default))
          or (isinstance(default, float) and isinstance(value, int)
              and not isinstance(value, bool)))
    if isinstance(default, int) and isinstance(value, bool) and not isinstance(default, bool):
      ok = False
    if not ok:
      raise ConfigError(f"config {name!r}={value!r} has type {type(value).__name__}; "
                        f"expected {type(default).__name__} (like the default {default!r})")


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
  if value not in options:
    raise ConfigError(f"config {name!r}={value!r}: expected one of {', '.join(options)}")


def check_cpu_devices(cfg: ml_collections.ConfigDict) -> None:
  """mesh.cpu_devices and mesh.cpu_allocator are read before JAX starts (and before
  `validate`): check them first."""
  n = cfg.mesh.get("cpu_devices", 0)
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    raise ConfigError(f"config 'mesh.cpu_devices'={n!r} must be an integer >= 0 "
                      "(0: one XLA device per CPU core, N: exactly N)")
  _choice("mesh.cpu_allocator", cfg.mesh.get("cpu_allocator", "auto"),
          CHOICES["mesh.cpu_allocator"])


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Fills in the one axis given as -1; raises naming the mesh fields when sizes disagree."""
  sizes = [data, fsdp, tensor]
  names = [f"mesh.{a}" for a in MESH_AXES]
  bad = [n for n, s in zip(names, sizes) if s == 0 or s < -1]
  if bad:
    raise ValueError(f"{', '.join(bad)} must be a positive size or -1, got {sizes}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one of {names} may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"mesh {dict(zip(names, sizes))}: {num_devices} devices are not divisible by "
          f"{known}; change the mesh sizes so their product divides the device count")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices but "
        f"{num_devices} are present; set mesh.data=-1 or sizes whose product is {num_devices}")
  return tuple(sizes)  # type: ignore[return-value]


def validate(cfg: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
  """Raises ConfigError naming the first wrong field; runs before anything compiles.

  The data, model and train code trust what is checked here and do not check it again.
  """
  _check_schema(cfg, base_config(), "")
  _choice("task", cfg.task, CHOICES["task"])
  check_cpu_devices(cfg)
  m, d, t = cfg.model, cfg.data, cfg.train
  _choice("model.pos_emb", m.pos_emb, CHOICES["model.pos_emb"])
  _choice("model.norm", m.norm, CHOICES["model.norm"])
  _choice("model.mlp", m.mlp, CHOICES["model.mlp"])
  _choice("model.remat", m.remat, CHOICES["model.remat"])
  _choice("model.attention_impl", m.attention_impl, CHOICES["model.attention_impl"])
  _choice("train.schedule", t.schedule, CHOICES["train.schedule"])
  _choice("train.precision", t.precision, CHOICES["train.precision"])
  _choice("mesh.opt_state", cfg.mesh.get("opt_state", "auto"), CHOICES["mesh.opt_state"])
  for name in ("num_layers", "num_heads", "d_model", "max_seq_len"):
    if m[name] <= 0:
      raise ConfigError(f"config 'model.{name}'={m[name]} must be positive")
  if m.d_model % m.num_heads:
    raise ConfigError(f"config 'model.d_model'={m.d_model} is not divisible by "
                      f"'model.num_heads'={m.num_heads}")
  kv = m.num_kv_heads or m.num_heads
  if m.num_heads % kv:
    raise ConfigError(f"config 'model.num_kv_heads'={kv} must divide "
                      f"'model.num_heads'={m.num_heads}")
  if m.pos_emb == "rope" and (m.d_model // m.num_heads) % 2:
    raise ConfigError("config 'model.pos_emb'='rope' needs an even head size "
                      f"(d_model/num_heads = {m.d_model // m.num_heads})")
  if d.seq_len > m.max_seq_len:
    raise ConfigError(f"config 'data.seq_len'={d.seq_len} is longer than the model's "
                      f"positions 'model.max_seq_len'={m.max_seq_len}; shorten data.seq_len "
                      "or raise model.max_seq_len")
  if not 0.0 <= m.dropout < 1.0:
    raise ConfigError(f"config 'model.dropout'={m.dropout} must be in [0, 1)")
  if not 0.0 <= t.get("label_smoothing", 0.0) < 1.0:
    raise ConfigError(f"config 'train.label_smoothing'={t.label_smoothing} must be in [0, 1): "
                      "the share of each training target spread over all classes (0: off, "
                      "e.g. 0.1)")
  if t.epochs < 0 or (t.epochs > 0 and cfg.task != "cls"):
    raise ConfigError(f"config 'train.epochs'={t.epochs}: must be >= 0, and > 0 only for task "
                      "'cls' (steps from the TSV train file); otherwise set train.steps")
  if t.steps <= 0 or t.batch_size <= 0 or t.microbatches <= 0:
    raise ConfigError("config 'train.steps', 'train.batch_size' and 'train.microbatches' "
                      "must be positive")
  try:
    data, fsdp, _ = resolve_mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor,
                                       num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if t.batch_size % num_processes:
    raise ConfigError(f"config 'train.batch_size'={t.batch_size} is not divisible by the "
                      f"{num_processes} processes (each process loads its share of the rows)")
  if t.batch_size % t.microbatches:
    raise ConfigError(f"config 'train.batch_size'={t.batch_size} is not divisible by "
                      f"'train.microbatches'={t.microbatches}")
  shards = data * fsdp
  if (t.batch_size // t.microbatches) % shards:
    raise ConfigError(
        f"config 'train.batch_size'={t.batch_size} (per microbatch "
        f"{t.batch_size // t.microbatches}) is not divisible by the data-parallel size "
        f"mesh.data*mesh.fsdp={shards}; use a batch that is a multiple of "
        f"{shards * t.microbatches}")
  if t.warmup_steps < 0 or math.isnan(t.lr) or t.lr <= 0:
    raise ConfigError("config 'train.lr' must be positive and 'train.warmup_steps' >= 0")
  if not 0 < t.get("layer_decay", 1.0) <= 1:
    raise ConfigError(f"config 'train.layer_decay'={t.layer_decay}: the lr of each layer below "
                      "the top is this factor times the lr above it; use a value in (0, 1], "
                      "e.g. 0.9 (1: off)")
  if t.schedule == "lr_range" and not 0 < t.min_lr_ratio < 1:
    raise ConfigError(f"config 'train.min_lr_ratio'={t.min_lr_ratio}: train.schedule=lr_range "
                      "sweeps from lr * min_lr_ratio up to lr; use a ratio in (0, 1), e.g. 1e-6")
  _check_checkpointing(t)
  if not str(t.compile_cache).strip():
    raise ConfigError("config 'train.compile_cache' is empty; use auto, off or a directory")
  _check_data(d, cfg.task, cfg.model.init_from)
  _check_encoder(cfg)
  _check_finetune(cfg)
  _check_prune(cfg.prune, t.steps, cfg.peft.method)
  _check_quant(cfg.quant, cfg.peft.method)


def _check_checkpointing(t) -> None:
  """Checkpoint retention and non-finite handling (the train.* checkpoint keys)."""
  _choice("train.nonfinite", t.nonfinite, CHOICES["train.nonfinite"])
  _choice("train.best_mode", t.best_mode, CHOICES["train.best_mode"])
  if t.ckpt_every <= 0 or t.keep_checkpoints <= 0:
    raise ConfigError(f"config 'train.ckpt_every'={t.ckpt_every} and 'train.keep_checkpoints'="
                      f"{t.keep_checkpoints} must be positive")
  for name in ("log_every", "eval_every"):
    if t[name] <= 0:
      raise ConfigError(f"config 'train.{name}'={t[name]} must be positive (to evaluate "
                        "rarely, set it to train.steps)")
  if t.keep_best < 0 or t.max_bad_steps <= 0:
    raise ConfigError(f"config 'train.keep_best'={t.keep_best} must be >= 0 and "
                      f"'train.max_bad_steps'={t.max_bad_steps} positive")
  k = t.steps_per_call
  if k <= 0:
    raise ConfigError(f"config 'train.steps_per_call'={k} must be positive (1: one step per "
                      "call)")
  for name in ("steps", "log_every", "eval_every", "ckpt_every"):
    if t[name] % k:
      raise ConfigError(f"config 'train.{name}'={t[name]} is not a multiple of "
                        f"'train.steps_per_call'={k}: metrics, evals and checkpoints happen "
                        f"between calls; use a multiple of {k} or a smaller steps_per_call")
  if t.keep_best and (t.ckpt_every % t.eval_every or t.ckpt_every % t.log_every):
    raise ConfigError(f"config 'train.keep_best'={t.keep_best} ranks checkpoints by "
                      f"{t.best_metric!r}, which is only computed at eval steps: make "
                      f"'train.ckpt_every'={t.ckpt_every} a multiple of 'train.eval_every'="
                      f"{t.eval_every} and 'train.log_every'={t.log_every}")


def _check_data(d, task: str, init_from: str = "") -> None:
  """The data pipeline's fields: names, choices and mixture entries."""
  _choice("data.tokenizer", d.tokenizer, CHOICES["data.tokenizer"])
  _choice("data.specials", d.specials, CHOICES["data.specials"])
  _choice("data.batching", d.batching, CHOICES["data.batching"])
  if not 0.0 <= d.val_fraction < 1.0:
    raise ConfigError(f"config 'data.val_fraction'={d.val_fraction} must be in [0, 1)")
  if d.prefetch < 0:
    raise ConfigError(f"config 'data.prefetch'={d.prefetch} must be >= 0 (0: no prefetch)")
  if d.shuffle_buffer < 0:
    raise ConfigError(f"config 'data.shuffle_buffer'={d.shuffle_buffer} must be >= 0")
  if not re.fullmatch(r"\s*(auto|off|\d+(\s*,\s*\d+)*)\s*", str(d.buckets).lower()):
    raise ConfigError(f"config 'data.buckets'={d.buckets!r}: expected auto, off or "
                      "comma-separated widths such as 16,32,64")
  if d.sort_window < 0:
    raise ConfigError(f"config 'data.sort_window'={d.sort_window} must be >= 0 (0: off)")
  if d.streaming and (d.mixture or d.source not in ("files", "hf")
                      or d.batching not in ("windows", "packed") or d.tokenizer == "char"):
    raise ConfigError("config 'data.streaming'=True needs data.source files or hf (no "
                      "mixture), data.batching windows or packed, and a byte/bpe/pretrained "
                      f"tokenizer; got source={d.source}, batching={d.batching}, "
                      f"tokenizer={d.tokenizer}, mixture of {len(d.mixture)}")
  specials = special_set(d.specials, task)
  if d.tokenizer == "bpe" and d.bpe_vocab_size < 256 + len(SPECIAL_SETS[specials]):
    raise ConfigError(f"config 'data.bpe_vocab_size'={d.bpe_vocab_size} must be at least "
                      f"{256 + len(SPECIAL_SETS[specials])} (256 bytes + the {specials} "
                      "special tokens)")
  if d.tokenizer == "pretrained" and not (d.tokenizer_path or init_from):
    raise ConfigError("config 'data.tokenizer'='pretrained' needs 'data.tokenizer_path' (a "
                      "tokenizer.json, a Hugging Face tokenizer directory or an lmos workdir) "
                      "or 'model.init_from' (its tokenizer is used)")
  entries = [("data", dict(d))] if not d.mixture else []
  for i, e in enumerate(d.mixture):
    if not isinstance(e, dict):
      raise ConfigError(f"config 'data.mixture[{i}]'={e!r} must be a dict of source fields "
                        f"({', '.join(SPEC_FIELDS)})")
    unknown = set(e) - set(SPEC_FIELDS)
    if unknown:
      raise ConfigError(f"config 'data.mixture[{i}]' has unknown keys {sorted(unknown)}; "
                        f"allowed: {', '.join(SPEC_FIELDS)}")
    w = e.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
      raise ConfigError(f"config 'data.mixture[{i}].weight'={w!r} must be a positive number")
    entries.append((f"data.mixture[{i}]", {k: e.get(k, d[k]) for k in SPEC_FIELDS
                                            if k != "weight"}))
  for name, e in entries:
    _choice(f"{name}.source", e["source"], CHOICES["data.source"])
    _choice(f"{name}.format", e["format"], CHOICES["data.format"])
    if e["source"] in ("text", "files") and not e["path"]:
      raise ConfigError(f"config '{name}.path' is empty; {name}.source={e['source']} needs a "
                        "file path or glob")
    if e["source"] == "hf" and not e["hf_name"]:
      raise ConfigError(f"config '{name}.hf_name' is empty; give a dataset name, a local "
                        "dataset directory or a builder such as json with data.path files")


def _check_encoder(cfg) -> None:
  """BERT / MLM / pretrained-start fields."""
  m = cfg.model
  _choice("model.arch", m.arch, CHOICES["model.arch"])
  _choice("model.head", m.head, CHOICES["model.head"])
  _choice("model.pooling", m.get("pooling", "cls"), CHOICES["model.pooling"])
  if m.arch == "bert":
    fixed = {"pos_emb": "learned", "norm": "layernorm", "use_bias": True,
             "tie_embeddings": True}
    wrong = [f"model.{k}={m[k]!r} (BERT needs {v!r})" for k, v in fixed.items() if m[k] != v]
    if m.mlp not in ("gelu", "gelu_exact"):
      wrong.append(f"model.mlp={m.mlp!r} (BERT needs gelu_exact or gelu)")
    if m.num_kv_heads not in (0, m.num_heads):
      wrong.append(f"model.num_kv_heads={m.num_kv_heads} (BERT has no grouped-query heads)")
    if wrong:
      raise ConfigError("config 'model.arch'='bert' does not support: " + "; ".join(wrong))
  if m.arch == "bert" and m.head == "cls" and m.num_labels <= 0:
    raise ConfigError("config 'model.head'='cls' needs 'model.num_labels' > 0")
  if cfg.task == "mlm":
    if m.arch != "bert" or m.head not in ("auto", "mlm") or m.num_labels:
      raise ConfigError("config 'task'='mlm' needs 'model.arch'='bert' with the MLM head "
                        "(model.head auto or mlm, model.num_labels 0)")
    if not 0.0 < cfg.data.mlm_prob < 1.0:
      raise ConfigError(f"config 'data.mlm_prob'={cfg.data.mlm_prob} must be in (0, 1)")
    if cfg.data.batching == "packed":
      raise ConfigError("config 'task'='mlm' needs unpacked windows: set 'data.batching' to "
                        "random or windows (packed rows would attend across documents)")
  if m.init_from and init_from_kind(m.init_from) == "workdir":
    _check_same_architecture(m, json.loads((Path(m.init_from) / "config.json").read_text()))


# Model fields that fix what a checkpoint computes (vocab_size and d_ff are checked by shape
# when the weights load, since 0 means "derived").
ARCH_FIELDS = ("arch", "num_layers", "num_heads", "d_model", "max_seq_len", "pos_emb",
               "rope_theta", "norm", "norm_eps", "mlp", "use_bias", "tie_embeddings",
               "type_vocab_size")


def init_from_kind(path: str) -> str:
  """'hf' for a Hugging Face model folder, 'workdir' for an lmos run directory.

  Both hold a config.json: a Hugging Face one names its model_type, an lmos one is a run
  config with a `model` block, and a workdir keeps its weights in checkpoints/ (`lmos
  train`) or params/ (`lmos convert --from-hf`).
  """
  where = f"config 'model.init_from'={path!r}"
  p = Path(path)
  if not (p / "config.json").is_file():
    raise ConfigError(f"{where} has no config.json; give a Hugging Face model folder "
                      "(config.json + *.safetensors) or an lmos workdir")
  try:
    c = json.loads((p / "config.json").read_text())
  except ValueError as e:
    raise ConfigError(f"{where}: config.json is not JSON ({e})") from None
  if isinstance(c, dict) and "model_type" in c:
    return "hf"
  if isinstance(c, dict) and isinstance(c.get("model"), dict):
    if (p / "checkpoints").is_dir() or (p / "params").is_dir():
      return "workdir"
    raise ConfigError(f"{where} is an lmos workdir without weights (no checkpoints/ or "
                      "params/); train it first or give another folder")
  raise ConfigError(f"{where}: its config.json is neither a Hugging Face model config "
                    "(model_type) nor an lmos run config (a model block)")


def _check_same_architecture(m, source: dict) -> None:
  """A run starting from an lmos workdir must build the model that workdir trained."""
  src = source["model"]
  wrong = [f"model.{k}={m[k]!r} (source {src[k]!r})" for k in ARCH_FIELDS
           if k in src and src[k] != m[k]]
  kv, src_kv = m.num_kv_heads or m.num_heads, src.get("num_kv_heads") or src.get("num_heads")
  if m.num_heads == src.get("num_heads") and kv != src_kv:  # 0 means num_heads
    wrong.append(f"model.num_kv_heads={m.num_kv_heads} (source {src.get('num_kv_heads')})")
  if wrong:
    raise ConfigError(f"config 'model.init_from'={m.init_from!r} trained another model: "
                      f"{'; '.join(wrong)}; set these to the source run's values")


def _check_finetune(cfg) -> None:
  """task 'cls' and the peft block."""
  d = cfg.data
  if cfg.task == "cls" and (cfg.model.arch != "bert" or cfg.model.num_labels <= 0):
    raise ConfigError("config 'task'='cls' needs 'model.arch'='bert' and 'model.num_labels' > 0")
  if cfg.task == "cls" and (not d.train or not d.dev):
    raise ConfigError("config 'task'='cls' needs 'data.train' and 'data.dev' (TSV files with a "
                      "header row naming the text and label columns)")
  if cfg.task == "cls" and d.tokenizer != "pretrained":
    raise ConfigError("config 'task'='cls' needs 'data.tokenizer'='pretrained' with "
                      "'data.tokenizer_path' holding a tokenizer.json (a BERT vocabulary)")
  _check_rec(cfg)
  _check_peft(cfg.peft, cfg.train.steps)


def _check_rec(cfg) -> None:
  """task 'rec' and the recommender's model: each needs the other, and its data files."""
  m, d = cfg.model, cfg.data
  if (cfg.task == "rec") != (m.arch == "rec"):
    raise ConfigError(f"config 'task'={cfg.task!r} with 'model.arch'={m.arch!r}: the "
                      "recommender (model.arch 'rec') is trained by task 'rec' and only by it")
  if cfg.task != "rec":
    return
  _choice("model.item_repr", m.item_repr, CHOICES["model.item_repr"])
  if not 0.0 <= m.id_dropout < 1.0:
    raise ConfigError(f"config 'model.id_dropout'={m.id_dropout} must be in [0, 1)")
  if not d.catalogue or not d.train:
    raise ConfigError("config 'task'='rec' needs 'data.catalogue' (item<TAB>title<TAB>genres) "
                      "and 'data.train' (user<TAB>item<TAB>timestamp)")
  if cfg.train.sample_tokens:
    raise ConfigError("config 'train.sample_tokens' must be 0 for task 'rec' (a recommender "
                      "ranks items; it writes no text)")
  if cfg.peft.method != "full":
    raise ConfigError(f"config 'peft.method'={cfg.peft.method!r}: task 'rec' trains its "
                      "small model in full (the text encoder is frozen); set peft.method=full")


def _check_peft(p, total_steps: int) -> None:
  """The peft block, AdaLoRA's rank budget included (it must have steps to shrink in)."""
  _choice("peft.method", p.method, CHOICES["peft.method"])
  if p.method == "full":
    return
  if p.method in ("lora", "adalora") and p.rank <= 0:
    raise ConfigError(f"config 'peft.rank'={p.rank} must be positive")
  if p.method == "adapters" and p.adapter_size <= 0:
    raise ConfigError(f"config 'peft.adapter_size'={p.adapter_size} must be positive")
  if not 0.0 <= p.dropout < 1.0:
    raise ConfigError(f"config 'peft.dropout'={p.dropout} must be in [0, 1)")
  if p.method != "adalora":
    return
  if not 0 < p.target_rank <= p.rank:
    raise ConfigError(f"config 'peft.target_rank'={p.target_rank} must be in "
                      f"[1, peft.rank={p.rank}]")
  t_final = p.t_final or default_t_final(total_steps)
  if p.t_init + t_final >= total_steps:
    raise ConfigError(f"config 'peft.t_init'={p.t_init} + 'peft.t_final'={t_final} must be "
                      f"below train.steps={total_steps}: the budget needs steps to shrink in")
  if p.delta_t <= 0:
    raise ConfigError(f"config 'peft.delta_t'={p.delta_t} must be positive")
  if not p.lambda_lr_scale > 0:
    raise ConfigError(f"config 'peft.lambda_lr_scale'={p.lambda_lr_scale} must be positive")


def _check_prune(p, total_steps: int, peft_method: str) -> None:
  """The prune block: every knob in its range (whatever the method, so a typo in an unused
  one is caught too), the method's needs, and a schedule that fits the steps."""
  _choice("prune.method", p.method, CHOICES["prune.method"])
  _choice("prune.schedule", p.schedule, CHOICES["prune.schedule"])
  if not 0.0 <= p.sparsity < 1.0:
    raise ConfigError(f"config 'prune.sparsity'={p.sparsity} must be in [0, 1) (the share of "
                      "each kernel's weights set to zero), e.g. 0.5")
  if not 0.0 < p.alpha <= 1.0:
    raise ConfigError(f"config 'prune.alpha'={p.alpha} must be in (0, 1] (weights below "
                      "alpha * max|W| of their layer are pruned), e.g. 0.1")
  if not 0 < p.n < p.m:
    raise ConfigError(f"config 'prune.n'={p.n} and 'prune.m'={p.m} must satisfy 0 < n < m "
                      "(n of every m inputs kept), e.g. 2 and 4")
  if p.begin_step < 0 or p.end_step < 0 or p.update_every <= 0:
    raise ConfigError(f"config 'prune.begin_step'={p.begin_step} and 'prune.end_step'="
                      f"{p.end_step} must be >= 0 and 'prune.update_every'={p.update_every} "
                      "positive")
  if p.method == "none":
    return
  if peft_method != "full":
    raise ConfigError(f"config 'prune.method'={p.method!r} prunes the trained kernels and needs "
                      f"'peft.method'='full' (got {peft_method!r}); prune the full model, or "
                      "set prune.method=none")
  if p.method == "nm" and p.schedule != "oneshot":
    raise ConfigError(f"config 'prune.schedule'={p.schedule!r}: N:M masks have no sparsity "
                      "to ramp; set prune.schedule=oneshot with prune.method=nm")
  if p.schedule == "oneshot" and p.begin_step >= total_steps:
    raise ConfigError(f"config 'prune.begin_step'={p.begin_step} is not below train.steps="
                      f"{total_steps}: a one-shot prune there would never happen")
  if p.schedule == "gradual":
    end = p.end_step or default_prune_end(total_steps)
    if not p.begin_step < end <= total_steps:
      raise ConfigError(f"config 'prune.end_step'={end} must be after 'prune.begin_step'="
                        f"{p.begin_step} and at most train.steps={total_steps} (0: 80% of "
                        "train.steps)")


def _check_quant(q, peft_method: str) -> None:
  """The quant block (QAT); whether group_size divides the kernels is checked by the step."""
  _choice("quant.qat", q.qat, CHOICES["quant.qat"])
  if q.group_size < 0:
    raise ConfigError(f"config 'quant.group_size'={q.group_size} must be >= 0 (0: one scale "
                      "per output channel)")
  if q.qat != "none" and peft_method != "full":
    raise ConfigError(f"config 'quant.qat'={q.qat!r} fake-quantizes the trained kernels and "
                      f"needs 'peft.method'='full' (got {peft_method!r})")
