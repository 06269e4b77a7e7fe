"""A small BERT pretrained from scratch with masked-LM on the embedded corpus (2 CPU cores).

Tokenizer: a byte-level BPE trained on the corpus (cached in WORKDIR/tokenizer/) with BERT's
special tokens [PAD] [UNK] [CLS] [SEP] [MASK] (data.specials='bert'): [MASK] for the masking,
and the [CLS] a [SEP] [PAD] framing that a classifier finetuned from this run needs, since
that run reads this workdir's tokenizer. Every training row starts with [CLS]; BERT masking
(15%: 80/10/10) is applied to the pipeline's windows by lmos_jax.data.encoder.MLMData.
Args: `tiny` (tests) or `small`.

Run: lmos train --config configs/bert_mlm.py --workdir runs/bert_mlm
Then finetune it as a classifier: configs/bert_cls.py (same argument).
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
  d.source, d.tokenizer, d.specials, d.batching = "embedded", "bpe", "bert", "random"
  d.mlm_prob = 0.15
  t.schedule, t.weight_decay, t.b2, t.grad_clip = "warmup_linear", 0.01, 0.999, 1.0
  t.sample_tokens = 0  # an encoder does not generate
  if arg == "small":  # ~1.1M params, a quarter of them the 2048-token embedding
    m.num_layers, m.num_heads, m.d_model = 4, 4, 128
    d.seq_len = m.max_seq_len = 128
    d.bpe_vocab_size = 2048
    d.max_chars = 2_000_000  # BPE training + encoding take ~15 s at this size
    t.batch_size, t.steps, t.lr, t.warmup_steps = 16, 600, 1e-3, 60
    t.eval_every, t.eval_batches, t.ckpt_every, t.log_every = 100, 8, 300, 50
  elif arg == "tiny":
    m.num_layers, m.num_heads, m.d_model, m.dropout = 2, 2, 64, 0.0
    d.seq_len = m.max_seq_len = 32
    d.max_chars = 200_000
    d.bpe_vocab_size = 512
    t.batch_size, t.steps, t.lr, t.warmup_steps = 16, 40, 3e-3, 4
    t.eval_every, t.eval_batches, t.ckpt_every, t.log_every = 40, 2, 40, 10
    t.progress = False
  else:
    raise ValueError(f"bert_mlm.py:{arg}: expected the argument small or tiny")
  return c
