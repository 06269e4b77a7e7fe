"""GPT-style decoder (GPT-2 and Llama options) as a Flax NNX module used functionally."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmos_jax.models.layers import (Dense, Norm, TransformerConfig, dropout, logits_matmul,
                                    make_blocks, normal, padding_mask, param, run_blocks)
from lmos_jax.models.layers import attention_mask as segment_mask
from lmos_jax.models.quantized import is_qarray
from lmos_jax.parallel.sharding import constrain

Array = jax.Array


class GPT(nnx.Module):
  """Token (+ learned position) embedding, N pre-LN blocks, final norm, LM head."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model),
                       ("vocab", "embed"))
    self.pos_embed = (param(rngs, normal(cfg.init_std), (cfg.max_seq_len, cfg.d_model),
                            ("pos", "embed")) if cfg.pos_emb == "learned" else None)
    self.blocks = make_blocks(cfg, rngs)
    self.final_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, use_bias=cfg.use_bias,
                           rngs=rngs)
    self.lm_head = (None if cfg.tie_embeddings else
                    Dense((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"),
                          use_bias=False, std=cfg.init_std, rngs=rngs))

  @property
  def dtype(self):
    """The compute dtype: the embedding's (its scales' for a quantized tied table)."""
    return self.embed.get_value().dtype

  def embed_tokens(self, tokens_BT: Array, positions_BT: Array, dtype) -> Array:
    table = self.embed.get_value()
    if is_qarray(table):  # a quantized tied embedding is stored as the LM head's (D, V)
      x_BTD = table.columns(tokens_BT).astype(dtype)
    else:
      x_BTD = jnp.take(table, tokens_BT, axis=0).astype(dtype)
    if self.pos_embed is not None:
      x_BTD = x_BTD + jnp.take(self.pos_embed[...], positions_BT, axis=0).astype(dtype)
    return constrain(x_BTD, ("batch", "length", "act_embed"))

  def logits(self, x_BTD: Array) -> Array:
    """LM head in the compute dtype with float32 accumulation and output."""
    x_BTD = self.final_norm(x_BTD)
    table = self.embed.get_value()
    if is_qarray(table):
      logits = table.matmul(x_BTD).astype(jnp.float32)
      return constrain(logits, ("batch", "length", "act_vocab"))
    if self.lm_head is None:
      w_DV = self.embed[...].astype(x_BTD.dtype).T
    else:
      w_DV = self.lm_head.kernel[...].astype(x_BTD.dtype)
    logits = logits_matmul(x_BTD, w_DV)
    return constrain(logits, ("batch", "length", "act_vocab"))

  def __call__(self, input_ids: Array, *, attention_mask: Array | None = None,
               position_ids: Array | None = None, token_type_ids: Array | None = None,
               segment_ids: Array | None = None, rng: Array | None = None) -> Array:
    """Logits (B, T, V) in float32 for int ids (B, T); `rng` given means training mode.

    Keywords as in Hugging Face: `attention_mask` (1 attend, 0 padding) hides padded keys
    on top of causality, `position_ids` default to 0..T-1. `segment_ids` (packed rows)
    keep attention inside each document. A decoder has no token-type embeddings, so
    `token_type_ids` is refused rather than ignored (GPT-2 in transformers adds them).
    """
    if token_type_ids is not None:
      raise ValueError("GPT has no token-type embeddings: call it without token_type_ids")
    cfg = self.cfg
    tokens_BT = input_ids
    b, t = tokens_BT.shape
    index_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    positions_BT = index_BT if position_ids is None else position_ids
    k_emb, k_blocks = (None, None) if rng is None else jax.random.split(rng)
    x_BTD = dropout(self.embed_tokens(tokens_BT, positions_BT, self.dtype), cfg.dropout,
                    k_emb)
    if attention_mask is None and segment_ids is None:
      mask, is_causal = None, True  # plain causal attention: the kernels' fast path
    else:  # causal by index, within segments, padded keys hidden
      mask = segment_mask(segment_ids, segment_ids, index_BT, index_BT)
      if attention_mask is not None:
        # A query left of all real tokens (left padding) would see no key at all; letting
        # each query see itself keeps that unused output finite on every kernel and changes
        # no real query (its own key is visible already).
        mask = (mask & padding_mask(attention_mask)) | jnp.eye(t, dtype=bool)
      is_causal = False
    x_BTD = run_blocks(self.blocks, cfg, x_BTD, positions_BT, mask, is_causal=is_causal,
                       key=k_blocks)
    return self.logits(x_BTD)


def gpt_config_from(model_cfg, vocab_size: int) -> TransformerConfig:
  """TransformerConfig from the `model` block of an lmos config."""
  m = model_cfg
  d_ff = m.d_ff or (4 * m.d_model if m.mlp != "swiglu" else _llama_ff(m.d_model))
  return TransformerConfig(
      vocab_size=m.vocab_size or vocab_size, num_layers=m.num_layers, num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads, d_model=m.d_model, d_ff=d_ff, max_seq_len=m.max_seq_len,
      pos_emb=m.pos_emb, rope_theta=m.rope_theta, norm=m.norm, norm_eps=m.norm_eps,
      mlp=m.mlp, use_bias=m.use_bias, tie_embeddings=m.tie_embeddings, dropout=m.dropout,
      scan_layers=m.scan_layers, remat=m.remat, attention_impl=m.attention_impl,
      init_std=m.init_std)


def _llama_ff(d_model: int, multiple: int = 64) -> int:
  """Llama's SwiGLU width: 2/3 of 4d rounded up to a multiple (keeps FLOPs near GELU's)."""
  f = int(2 * 4 * d_model / 3)
  return multiple * ((f + multiple - 1) // multiple)


def count_params(state) -> int:
  return sum(x.size for x in jax.tree.leaves(state))
