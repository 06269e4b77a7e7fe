"""A small BERT pretrained from scratch with masked-LM on the embedded corpus (2 CPU cores).

Byte tokenizer plus an appended [MASK] id; BERT masking (15%: 80/10/10) is applied to the
pipeline's windows by lmos_jax.data.encoder.MLMData. Args: `tiny` (tests) or `small`.

Run: lmos train --config configs/bert_mlm.py --workdir runs/bert_mlm
"""

from lmos_jax.config.schema import base_config


def get_config(arg=None):
  arg = arg or "small"
  c = base_config()
  c.task = "mlm"
  m, d, t = c.model, c.data, c.train
  m.arch = "bert"
  m.mlp, m.norm, m.norm_eps, m.pos_emb = "gelu_exact", "layernorm", 1e-12, "learned"
  m.type_vocab_size, m.num_labels, m.head = 2, 0, "mlm"
  m.dropout = 0.1
  d.source, d.tokenizer, d.batching = "embedded", "byte", "random"
  d.mlm_prob = 0.15
  t.schedule, t.weight_decay, t.b2, t.grad_clip = "warmup_linear", 0.01, 0.999, 1.0
  t.sample_tokens = 0  # an encoder does not generate
  if arg == "small":  # ~0.9M params; about 1 s/step on 2 busy CPU cores
    m.num_layers, m.num_heads, m.d_model = 4, 4, 128
    d.seq_len = m.max_seq_len = 128
    t.batch_size, t.steps, t.lr, t.warmup_steps = 16, 600, 1e-3, 60
    t.eval_every, t.eval_batches, t.ckpt_every, t.log_every = 100, 8, 300, 50
  elif arg == "tiny":
    m.num_layers, m.num_heads, m.d_model, m.dropout = 2, 2, 64, 0.0
    d.seq_len = m.max_seq_len = 32
    d.max_chars = 200_000
    t.batch_size, t.steps, t.lr, t.warmup_steps = 16, 40, 3e-3, 4
    t.eval_every, t.eval_batches, t.ckpt_every, t.log_every = 40, 2, 40, 10
    t.progress = False
  else:
    raise ValueError(f"bert_mlm.py:{arg}: expected the argument small or tiny")
  return c
