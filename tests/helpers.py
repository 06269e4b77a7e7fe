"""Small shared builders for tests: tiny configs and models."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from lmos_jax.config.schema import base_config
from lmos_jax.models.layers import TransformerConfig
from lmos_jax.tree import path_str


def tiny_tcfg(**overrides) -> TransformerConfig:
  kw = dict(vocab_size=61, num_layers=2, num_heads=4, d_model=32, d_ff=64, max_seq_len=16)
  kw.update(overrides)
  return TransformerConfig(**kw)


def tiny_config(**train_overrides):
  """A run config small enough for a unit test on 8 simulated devices."""
  c = base_config()
  c.model.num_layers, c.model.num_heads, c.model.d_model, c.model.max_seq_len = 2, 4, 32, 16
  c.data.seq_len, c.data.max_chars = 16, 50_000
  c.train.batch_size, c.train.steps, c.train.warmup_steps = 8, 4, 1
  c.train.eval_every = c.train.ckpt_every = c.train.log_every = 2
  c.train.eval_batches, c.train.sample_tokens, c.train.progress = 1, 0, False
  for k, v in train_overrides.items():
    c.train[k] = v
  return c


def leaves_by_path(tree: Any) -> dict[str, np.ndarray]:
  """{'blocks/0/attn/query/kernel': array}: the leaves named by path, whatever the containers
  (nnx.State, dicts, lists), so two trees can be compared by name."""
  return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def same_leaf_names(a: Any, b: Any) -> tuple[dict, dict]:
  """Both trees' leaves by name, after checking the names agree (a dropped leaf fails)."""
  la, lb = leaves_by_path(a), leaves_by_path(b)
  assert la.keys() == lb.keys(), (f"leaves only in the first: {sorted(la.keys() - lb.keys())}; "
                                  f"only in the second: {sorted(lb.keys() - la.keys())}")
  return la, lb


def assert_trees_equal(a: Any, b: Any) -> None:
  """Same leaf names, and every leaf bit-equal in shape and value."""
  la, lb = same_leaf_names(a, b)
  for name, x in la.items():
    np.testing.assert_array_equal(x, lb[name], err_msg=name, strict=True)


def assert_trees_close(a: Any, b: Any, **tol: float) -> None:
  """Same leaf names, and every leaf equal within `tol` (np.testing.assert_allclose's)."""
  la, lb = same_leaf_names(a, b)
  for name, x in la.items():
    np.testing.assert_allclose(x, lb[name], err_msg=name, **tol)


def subprocess_env(devices: int | None = None, **extra: str) -> dict[str, str]:
  """This process's environment for a child process, with conftest's XLA flags kept but the
  forced CPU device count replaced by `devices` (None: no count, JAX's or lmos's own)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return {**os.environ, "XLA_FLAGS": " ".join(flags), **extra}



def tiny_bert_hf_dir(path, num_labels: int = 0, seed: int = 3, max_seq_len: int = 64,
                     init_std: float = 0.5):
  """A Hugging Face folder of a tiny random BERT (2 layers of width 32, weights drawn wide by
  default: init_std 0.5) with MiniLM's tokenizer: a classifier for `num_labels` > 0, else a
  bare encoder. ~1 s; what tests use where a real encoder would be slow."""
  from flax import nnx
  from lmos_jax.models.bert import BERT
  from lmos_jax.models.hf import copy_tokenizer, minilm_dir, save_hf, spec_from_lmos_config
  m = base_config().model
  m.arch, m.num_layers, m.num_heads, m.d_model, m.d_ff = "bert", 2, 2, 32, 64
  m.max_seq_len, m.vocab_size, m.norm_eps, m.mlp = max_seq_len, 30522, 1e-12, "gelu_exact"
  m.head, m.num_labels, m.init_std = ("cls" if num_labels else "none"), num_labels, init_std
  spec = spec_from_lmos_config(m, 30522)
  params = nnx.to_pure_dict(nnx.split(BERT(spec.tcfg, head=m.head, rngs=nnx.Rngs(seed)))[1])
  hf = save_hf(spec, params, path)
  copy_tokenizer(minilm_dir(), hf)
  return hf


def tiny_classifier_workdir(root, labels: list[str], seq_len: int = 48, buckets: str = "auto",
                            seed: int = 3):
  """A tiny random BERT classifier (MiniLM's tokenizer, 2 layers of width 32) made a workdir
  by `lmos convert --from-hf`, with `labels` as its label names: ~1 s, no training. Weights
  drawn wide (init_std 0.5) so probabilities spread over the labels."""
  import json
  from pathlib import Path

  from lmos_jax.convert import from_hf_to_workdir
  root = Path(root)
  hf = tiny_bert_hf_dir(root / "hf", len(labels), seed)
  wd, _ = from_hf_to_workdir(hf, root / "wd")
  (wd / "labels.json").write_text(json.dumps(labels))
  saved = json.loads((wd / "config.json").read_text())
  saved["data"]["seq_len"], saved["data"]["buckets"] = seq_len, buckets
  (wd / "config.json").write_text(json.dumps(saved))
  return wd


def tiny_gpt_workdir(path, chars: str, layers: int, drop=()):
  """A params-only GPT workdir over a char vocabulary (random weights, no training),
  optionally with layers dropped after building (a trimmed draft)."""
  from flax import nnx
  from lmos_jax.compress.trim import drop_layers
  from lmos_jax.data.text import CharTokenizer
  from lmos_jax.data.tokenizer import SpecialChar
  from lmos_jax.models.factory import model_factory
  from lmos_jax.workdir import write_params_run
  cfg = base_config()
  m = cfg.model
  m.num_layers, m.num_heads, m.d_model, m.max_seq_len, m.init_std = layers, 4, 32, 32, 0.4
  cfg.data.tokenizer, cfg.data.seq_len = "char", m.max_seq_len  # windows the positions cover
  tok = SpecialChar(CharTokenizer(chars), ())
  graphdef, state = nnx.split(model_factory(m, tok.vocab_size)(nnx.Rngs(0)))
  params = state.to_pure_dict()
  if drop:
    graphdef, params = drop_layers(graphdef, params, drop)
    m.num_layers = layers - len(drop)
  return write_params_run(path, cfg, tok, params)
