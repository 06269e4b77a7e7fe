"""Next-item recommender: a causal transformer over a user's item history (SASRec's shape),
its items represented by id, by text, or both.

- `id`: a learned embedding per item (the sequence model).
- `text`: each item's text (title + genres) embedded once by a pretrained sentence encoder
  (MiniLM, mean-pooled), kept frozen in `item_text`, and mapped into the model by a trained
  two-layer projection: an item seen once in training, or never, is placed by what its text
  says rather than by an embedding that training barely moved.
- `hybrid`: the sum of both.

The item table E (N x D) is both the input embedding and the output layer (scores are
h . E_n), so `__call__` returns next-item logits (B, T, N) and the `lm` loss trains it
unchanged: the next item is the target at every position (full softmax over the catalogue,
exact at the sizes this is used for; padding row 0 is never predicted).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmos_jax.config.loading import ConfigError
from lmos_jax.config.schema import CHOICES
from lmos_jax.models.layers import (Dense, Norm, TransformerConfig, dropout, logits_matmul,
                                    make_blocks, normal, param, run_blocks)
from lmos_jax.parallel.sharding import constrain

Array = jax.Array
FROZEN = "item_text"  # the param holding the encoder's item vectors: never trained


class ItemSequenceModel(nnx.Module):
  """Item table (id and/or projected text), learned positions, pre-LN causal blocks."""

  def __init__(self, cfg: TransformerConfig, item_repr: str, text_NF: np.ndarray | None,
               text_dim: int, *, id_dropout: float = 0.0, rngs: nnx.Rngs):
    if item_repr not in CHOICES["model.item_repr"]:
      raise ConfigError(f"config 'model.item_repr'={item_repr!r}: expected one of "
                        f"{', '.join(CHOICES['model.item_repr'])}")
    self.cfg, self.item_repr, self.id_dropout = cfg, item_repr, id_dropout
    n, d, std = cfg.vocab_size, cfg.d_model, cfg.init_std
    self.item_embed = (param(rngs, normal(std), (n, d), ("vocab", "embed"))
                       if item_repr != "text" else None)
    if item_repr == "id":
      self.item_text = self.text_in = self.text_out = None
    else:
      if text_NF is None and text_dim <= 0:
        raise ConfigError(f"config 'model.text_dim'={text_dim}: item_repr {item_repr!r} needs "
                          "the text encoder's width (384 for MiniLM-L6)")
      if text_NF is not None and text_NF.shape != (n, text_dim):
        raise ConfigError(f"item text vectors have shape {text_NF.shape}, the model expects "
                          f"({n}, {text_dim}) (model.text_dim)")
      fixed = jnp.zeros((n, text_dim)) if text_NF is None else jnp.asarray(text_NF, jnp.float32)
      self.item_text = param(rngs, lambda *_: fixed, (n, text_dim), ("vocab", None))
      self.text_in = Dense((text_dim,), (d,), (None, "embed"), use_bias=True, std=std,
                           rngs=rngs)
      self.text_out = Dense((d,), (d,), ("embed", None), use_bias=True, std=std, rngs=rngs)
    self.pos_embed = param(rngs, normal(std), (cfg.max_seq_len, d), ("pos", "embed"))
    self.blocks = make_blocks(cfg, rngs)
    self.final_norm = Norm(d, cfg.norm, cfg.norm_eps, use_bias=cfg.use_bias, rngs=rngs)

  def item_table(self, dtype, key: Array | None = None) -> Array:
    """E (N, D): every item's vector, row 0 (padding) zero.

    hybrid, training (`key` given): each item's id part is dropped with probability
    `id_dropout` for the step, so the text part must place items alone, as it has to for
    items whose id embedding training barely moved (DropoutNet's idea)."""
    parts = []
    if self.item_embed is not None:
      id_ND = self.item_embed[...].astype(dtype)
      if key is not None and self.id_dropout > 0 and self.item_text is not None:
        keep_N1 = jax.random.bernoulli(key, 1.0 - self.id_dropout, (id_ND.shape[0], 1))
        id_ND = id_ND * keep_N1.astype(dtype)
      parts.append(id_ND)
    if self.item_text is not None:
      h_ND = jax.nn.gelu(self.text_in(jax.lax.stop_gradient(self.item_text[...]).astype(dtype)))
      parts.append(self.text_out(h_ND))
    e_ND = sum(parts[1:], parts[0])
    return e_ND.at[0].set(0)

  def hidden(self, e_ND: Array, input_ids: Array, rng: Array | None) -> Array:
    """The final-norm hidden state at every position (B, T, D); position i sees items <= i."""
    b, t = input_ids.shape
    if t > self.cfg.max_seq_len:
      raise ValueError(f"history length {t} exceeds model.max_seq_len={self.cfg.max_seq_len}")
    positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x_BTD = jnp.take(e_ND, input_ids, axis=0)
    x_BTD = x_BTD + self.pos_embed[...][:t].astype(x_BTD.dtype)
    k_emb, k_blocks = (None, None) if rng is None else jax.random.split(rng)
    x_BTD = constrain(dropout(x_BTD, self.cfg.dropout, k_emb), ("batch", "length", "act_embed"))
    x_BTD = run_blocks(self.blocks, self.cfg, x_BTD, positions_BT, None, is_causal=True,
                       key=k_blocks)
    return self.final_norm(x_BTD)

  def __call__(self, input_ids: Array, *, attention_mask: Array | None = None,
               position_ids: Array | None = None, token_type_ids: Array | None = None,
               segment_ids: Array | None = None, rng: Array | None = None) -> Array:
    """Next-item logits (B, T, N) in float32 for right-padded item rows (B, T).

    Histories are right-padded, so causal attention alone keeps padding out of every real
    position; the other keywords of the shared model signature are refused, not ignored.
    """
    if any(x is not None for x in (attention_mask, position_ids, token_type_ids, segment_ids)):
      raise ValueError("the recommender takes right-padded item rows only (no masks, "
                       "positions, token types or segments)")
    k_items, rng = (None, None) if rng is None else jax.random.split(rng)
    e_ND = self.item_table(self.pos_embed.dtype, k_items)
    h_BTD = self.hidden(e_ND, input_ids, rng)
    logits = logits_matmul(h_BTD, e_ND.astype(h_BTD.dtype).T)
    logits = logits.at[..., 0].set(-1e9)  # padding is never the next item
    return constrain(logits, ("batch", "length", "act_vocab"))

  def last_scores(self, input_ids: Array, lengths: Array) -> Array:
    """Scores (B, N) of every item as the next one after each history (its last real
    position, `lengths - 1`): what ranking reads."""
    logits_BTN = self(input_ids)
    return jnp.take_along_axis(logits_BTN, (lengths - 1)[:, None, None], axis=1)[:, 0]


def text_vectors(hf_dir: str, texts: Sequence[str], max_len: int = 32,
                 batch: int = 256) -> np.ndarray:
  """L2-normalised mean-pooled last hidden states of a Hugging Face encoder (MiniLM's
  sentence embedding) for `texts`: (len(texts), hidden). One compiled shape, batched."""
  from tokenizers import Tokenizer
  from pathlib import Path
  from lmos_jax.models.bert import masked_mean
  from lmos_jax.models.hf import load_hf

  tok = Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json"))
  tok.enable_truncation(max_len)
  tok.enable_padding(length=max_len)
  model = load_hf(hf_dir)
  graphdef, state = nnx.split(model)

  @jax.jit
  def embed(state, ids_BT, mask_BT):
    m = nnx.merge(graphdef, state)
    x_BTD = m.encode(ids_BT, attention_mask=mask_BT).astype(jnp.float32)
    mean_BD = masked_mean(x_BTD, mask_BT)
    return mean_BD / jnp.maximum(jnp.linalg.norm(mean_BD, axis=-1, keepdims=True), 1e-12)

  out = []
  for lo in range(0, len(texts), batch):
    enc = tok.encode_batch(list(texts[lo:lo + batch]))
    ids = np.zeros((batch, max_len), np.int32)
    mask = np.zeros((batch, max_len), np.int32)
    ids[:len(enc)] = [e.ids for e in enc]
    mask[:len(enc)] = [e.attention_mask for e in enc]
    out.append(np.asarray(embed(state, ids, mask))[:len(enc)])
  return np.concatenate(out)


def item_text_table(hf_dir: str, texts: Sequence[str]) -> np.ndarray:
  """The frozen `item_text` param: row 0 (padding) zero, row i the vector of texts[i-1],
  standardised per dimension over the catalogue. Sentence vectors of short titles share a
  large common part and differ in small ones; standardising puts the differences at unit
  scale, so the projection learns them at the same pace as the id embeddings learn."""
  v = text_vectors(hf_dir, texts)
  v = (v - v.mean(0)) / np.maximum(v.std(0), 1e-6)
  return np.concatenate([np.zeros((1, v.shape[1]), v.dtype), v.astype(np.float32)])
