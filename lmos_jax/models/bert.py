"""BERT encoder (BERT, MiniLM) on the shared layers: post-LN blocks, token types, heads.

Heads: "mlm" (masked-LM logits (B, T, V), decoder tied to the word embeddings as in BERT),
"cls" (a sentence vector + sequence classifier, logits (B, num_labels); sentence pairs via
token types) and "none" (the bare encoder, as in HF `BertModel`: returns hidden states (B, T, D)).
Parameters carry the same logical axis names as the decoder's, so the one sharding table
applies unchanged.

The classifier's sentence vector is `TransformerConfig.pooling`: "cls", BERT's pooler
(tanh(dense([CLS] state)), what Hugging Face's BertForSequenceClassification computes), or
"mean", the mean of the text's final hidden states with no pooler: how sentence-transformers
trains MiniLM (all-MiniLM-L6-v2), whose [CLS] state and pooler were never trained to stand for
the sentence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmos_jax.config.loading import ConfigError
from lmos_jax.models.layers import (Dense, Norm, TransformerConfig, dropout, logits_matmul,
                                    make_blocks, normal, padding_mask, param, run_blocks)
from lmos_jax.models.layers import attention_mask as segment_mask
from lmos_jax.parallel.sharding import constrain

Array = jax.Array
HEADS = ("mlm", "cls", "none")
POOLINGS = ("cls", "mean")


# Heads a finetune may start fresh when its pretrained source lacks them.
FRESH_HEADS = ("pooler", "classifier")


def fresh_heads(cfg: TransformerConfig, heads, seed: int) -> dict:
  """New pooler / classifier params as Hugging Face initialises them (N(0, init_std)
  kernel, zero bias), drawn on the host from `seed`, so loading the same source again
  (`lmos predict` rebuilding a PEFT run's base) gives the same values. Each head has its
  own stream: the classifier does not depend on whether the pooler was fresh too."""
  out = {}
  widths = {"pooler": cfg.d_model, "classifier": cfg.num_labels}
  for head in heads:
    if head not in widths:
      raise ValueError(f"fresh_heads: {head!r} is not one of {', '.join(FRESH_HEADS)}")
    rng = np.random.default_rng(seed if head == "classifier" else [seed, 1])
    kernel = rng.normal(0.0, cfg.init_std, (cfg.d_model, widths[head])).astype(np.float32)
    out[head] = {"kernel": kernel, "bias": np.zeros((widths[head],), np.float32)}
  return out


def has_pooler(cfg: TransformerConfig, head: str) -> bool:
  """Whether a BERT with this head holds a pooler: the bare encoder does (as HF's BertModel),
  a classifier only when it pools the [CLS] token."""
  return head == "none" or (head == "cls" and cfg.pooling == "cls")


def masked_mean(x_BTD: Array, mask_BT: Array | None) -> Array:
  """Mean over T of the positions `mask_BT` keeps (1 keep, 0 padding), summed in float32 and
  returned in x's dtype; a row with none kept gives zeros instead of NaN."""
  xf_BTD = x_BTD.astype(jnp.float32)
  if mask_BT is None:
    return xf_BTD.mean(axis=1).astype(x_BTD.dtype)
  m_BT = mask_BT.astype(jnp.float32)
  sum_BD = jnp.einsum("btd,bt->bd", xf_BTD, m_BT)
  return (sum_BD / jnp.maximum(m_BT.sum(axis=1), 1.0)[:, None]).astype(x_BTD.dtype)


def default_head(cfg: TransformerConfig) -> str:
  """A classifier when the config asks for labels, else the MLM pretraining head."""
  return "cls" if cfg.num_labels > 0 else "mlm"


class BERT(nnx.Module):
  """Embeddings (word + position + token type, LayerNorm), N post-LN blocks, one head."""

  def __init__(self, cfg: TransformerConfig, *, head: str | None = None, rngs: nnx.Rngs):
    head = head or default_head(cfg)
    if head not in HEADS:
      raise ValueError(f"BERT head={head!r}: expected one of {', '.join(HEADS)}")
    if head == "cls" and cfg.num_labels <= 0:
      raise ConfigError("BERT head='cls' needs num_labels > 0 (config 'model.num_labels')")
    if cfg.norm_position != "post":
      raise ValueError("BERT needs norm_position='post' in its "
                       "TransformerConfig (use bert_config_from)")
    if cfg.pooling not in POOLINGS:
      raise ValueError(f"BERT pooling={cfg.pooling!r}: expected one of {', '.join(POOLINGS)}")
    self.cfg, self.head = cfg, head
    d, std = cfg.d_model, cfg.init_std
    self.embed = param(rngs, normal(std), (cfg.vocab_size, d), ("vocab", "embed"))
    self.pos_embed = param(rngs, normal(std), (cfg.max_seq_len, d), ("pos", "embed"))
    self.type_embed = (param(rngs, normal(std), (cfg.type_vocab_size, d), ("types", "embed"))
                       if cfg.type_vocab_size > 0 else None)
    self.embed_norm = Norm(d, cfg.norm, cfg.norm_eps, use_bias=cfg.use_bias, rngs=rngs)
    self.blocks = make_blocks(cfg, rngs)
    self.pooler = (Dense((d,), (d,), ("embed", None), use_bias=True, std=std, rngs=rngs)
                   if has_pooler(cfg, head) else None)
    self.classifier = (Dense((d,), (cfg.num_labels,), ("embed", "labels"), use_bias=True,
                             std=std, rngs=rngs) if head == "cls" else None)
    if head == "mlm":
      self.mlm_dense = Dense((d,), (d,), ("embed", None), use_bias=True, std=std, rngs=rngs)
      self.mlm_norm = Norm(d, cfg.norm, cfg.norm_eps, use_bias=cfg.use_bias, rngs=rngs)
      self.mlm_bias = param(rngs, jax.nn.initializers.zeros, (cfg.vocab_size,), ("vocab",))
    else:
      self.mlm_dense = self.mlm_norm = self.mlm_bias = None

  def _act(self, x: Array) -> Array:
    return jax.nn.gelu(x, approximate=self.cfg.mlp != "gelu_exact")

  def encode(self, input_ids: Array, *, attention_mask: Array | None = None,
             position_ids: Array | None = None, token_type_ids: Array | None = None,
             segment_ids: Array | None = None, rng: Array | None = None) -> Array:
    """Final hidden states (B, T, D); keywords as in `__call__`."""
    cfg = self.cfg
    tokens_BT = input_ids
    b, t = tokens_BT.shape
    if t > cfg.max_seq_len:
      raise ValueError(f"BERT input length {t} exceeds max_seq_len={cfg.max_seq_len}")
    positions_BT = (jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
                    if position_ids is None else position_ids)
    dtype = self.embed.dtype
    x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(dtype)
    x_BTD = x_BTD + jnp.take(self.pos_embed[...], positions_BT, axis=0).astype(dtype)
    if self.type_embed is not None:
      types_BT = jnp.zeros_like(tokens_BT) if token_type_ids is None else token_type_ids
      x_BTD = x_BTD + jnp.take(self.type_embed[...], types_BT, axis=0).astype(dtype)
    elif token_type_ids is not None:
      raise ValueError("this BERT has no token-type embeddings (type_vocab_size=0): call it "
                       "without token_type_ids")
    k_emb, k_blocks = (None, None) if rng is None else jax.random.split(rng)
    x_BTD = dropout(self.embed_norm(x_BTD), cfg.dropout, k_emb)
    x_BTD = constrain(x_BTD, ("batch", "length", "act_embed"))
    mask = segment_mask(segment_ids, segment_ids, None, None)  # None without segments
    if attention_mask is not None:
      keys = padding_mask(attention_mask)
      mask = keys if mask is None else mask & keys
    return run_blocks(self.blocks, cfg, x_BTD, positions_BT, mask, is_causal=False,
                      key=k_blocks)

  def pool(self, x_BTD: Array, attention_mask: Array | None = None) -> Array:
    """The sentence vector (B, D) the classifier reads: tanh(dense(first token)) for
    pooling "cls", the mean over the tokens `attention_mask` keeps (all without one) for
    "mean"."""
    if self.cfg.pooling == "cls":
      return jnp.tanh(self.pooler(x_BTD[:, 0]))
    return masked_mean(x_BTD, attention_mask)

  def mlm_logits(self, x_BTD: Array) -> Array:
    """Transform (dense, GELU, LayerNorm), then the tied decoder plus its bias; float32."""
    h_BTD = self.mlm_norm(self._act(self.mlm_dense(x_BTD)))
    w_DV = self.embed[...].astype(h_BTD.dtype).T
    logits = logits_matmul(h_BTD, w_DV)
    logits = logits + self.mlm_bias[...].astype(jnp.float32)
    return constrain(logits, ("batch", "length", "act_vocab"))

  def __call__(self, input_ids: Array, *, attention_mask: Array | None = None,
               position_ids: Array | None = None, token_type_ids: Array | None = None,
               segment_ids: Array | None = None, rng: Array | None = None) -> Array:
    """MLM logits (B, T, V), class logits (B, num_labels), or hidden states for 'none'.

    Keywords as in Hugging Face's BertModel: `attention_mask` (1 token, 0 padding),
    `token_type_ids` (sentence A/B, default 0), `position_ids` (default 0..T-1); plus
    `segment_ids` (packed rows: no attention across segments) and `rng` (training mode:
    dropout on), the same keyword set as GPT.
    """
    x_BTD = self.encode(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        token_type_ids=token_type_ids, segment_ids=segment_ids, rng=rng)
    if self.head == "mlm":
      return self.mlm_logits(x_BTD)
    if self.head == "none":
      return x_BTD
    k_cls = None if rng is None else jax.random.fold_in(rng, 1)
    pooled_BD = dropout(self.pool(x_BTD, attention_mask), self.cfg.dropout, k_cls)
    return self.classifier(pooled_BD).astype(jnp.float32)


def bert_config_from(model_cfg, vocab_size: int) -> TransformerConfig:
  """TransformerConfig for BERT from the `model` block of an lmos config."""
  m = model_cfg
  if m.mlp not in ("gelu", "gelu_exact"):
    raise ConfigError(f"config 'model.mlp'={m.mlp!r}: BERT uses gelu_exact (BERT/MiniLM "
                      "checkpoints) or gelu (tanh approximation)")
  return TransformerConfig(
      vocab_size=m.vocab_size or vocab_size, num_layers=m.num_layers, num_heads=m.num_heads,
      d_model=m.d_model, d_ff=m.d_ff or 4 * m.d_model, max_seq_len=m.max_seq_len,
      pos_emb="learned", norm="layernorm", norm_eps=m.norm_eps, norm_position="post",
      mlp=m.mlp, use_bias=True, tie_embeddings=True,
      dropout=m.dropout, scan_layers=m.scan_layers, remat=m.remat,
      attention_impl=m.attention_impl, init_std=m.init_std,
      type_vocab_size=m.get("type_vocab_size", 2), num_labels=m.get("num_labels", 0),
      pooling=m.get("pooling", "cls"))
