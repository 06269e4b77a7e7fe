"""The one config schema: every key a run may set, with its default and type.

Config files start from `base_config()` and change fields; `validate` compares a loaded
config against this schema so a typo or a wrong type fails before anything compiles.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Defaults for a tiny decoder trained on the embedded corpus."""
  c = ml_collections.ConfigDict()
  c.task = "lm"  # lm (decoder pretraining); other tasks register their own names
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  m = c.model
  m.arch = "gpt"
  m.vocab_size = 0  # 0: taken from the tokenizer
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 0  # 0: same as num_heads (multi-head); fewer: grouped-query
  m.d_model = 128
  m.d_ff = 0  # 0: 4 * d_model (gelu) or the Llama rule (swiglu)
  m.max_seq_len = 128
  m.pos_emb = "learned"  # learned | rope
  m.rope_theta = 10000.0
  m.norm = "layernorm"  # layernorm | rmsnorm
  m.norm_eps = 1e-5
  m.mlp = "gelu"  # gelu | swiglu
  m.use_bias = True
  m.tie_embeddings = True
  m.dropout = 0.0
  m.scan_layers = True
  m.remat = "none"  # none | full | dots | dots_no_batch | save_attn_out
  m.attention_impl = "auto"  # auto | xla | cudnn
  m.init_std = 0.02

  c.data = ml_collections.ConfigDict()
  d = c.data
  d.source = "embedded"  # embedded | text
  d.path = ""  # a plain text file for source=text
  d.tokenizer = "byte"  # byte | char
  d.seq_len = 128
  d.val_fraction = 0.1
  d.max_chars = 4_000_000  # cap on the embedded corpus (deterministic prefix)

  c.train = ml_collections.ConfigDict()
  t = c.train
  t.batch_size = 16  # global batch, in sequences
  t.microbatches = 1  # gradient accumulation inside one step
  t.steps = 300
  t.lr = 3e-3
  t.schedule = "warmup_cosine"  # constant | warmup_cosine | warmup_linear | rsqrt | wsd
  t.warmup_steps = 30
  t.min_lr_ratio = 0.1
  t.decay_fraction = 0.2  # wsd: share of steps spent decaying at the end
  t.weight_decay = 0.1
  t.decay_embeddings = False
  t.decay_norms_and_biases = False
  t.l2 = 0.0  # L2 penalty added to the loss (distinct from decoupled weight decay)
  t.grad_clip = 1.0  # global-norm clip; 0 turns it off
  t.b1 = 0.9
  t.b2 = 0.99
  t.eps = 1e-8
  t.precision = "auto"  # fp32 | bf16 | bf16_full | auto
  t.eval_every = 100
  t.eval_batches = 4
  t.log_every = 10
  t.ckpt_every = 100
  t.keep_checkpoints = 3
  t.sample_tokens = 200
  t.sample_prompt = ""
  t.progress = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices left over
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c
