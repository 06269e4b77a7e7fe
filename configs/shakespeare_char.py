"""nanoGPT's shakespeare-char settings. Args: `cpu` (4L/4H/128d) or `baby` (6L/6H/384d).

The corpus is $LMOS_DATA_DIR/tinyshakespeare.txt (default data/tinyshakespeare.txt); see the
README's Data section for where it comes from, or point --config.data.path at another copy.

Run: lmos train --config configs/shakespeare_char.py:cpu --workdir runs/sc
"""

from lmos_jax.config.datadir import data_file
from lmos_jax.config.schema import base_config


def get_config(arg=None):
  arg = arg or "cpu"
  c = base_config()
  c.data.source, c.data.tokenizer = "text", "char"
  c.data.path = data_file("tinyshakespeare.txt")
  m, t = c.model, c.train
  m.use_bias, m.tie_embeddings = False, True  # nanoGPT: bias=False, tied wte/lm_head
  m.scan_layers = False  # 4-6 layers: unrolled is faster on CPU (experiments/bench_compile.py)
  t.schedule, t.min_lr_ratio = "warmup_cosine", 0.1
  t.weight_decay, t.b1, t.b2, t.grad_clip = 0.1, 0.9, 0.99, 1.0
  t.sample_prompt = "\n"
  if arg == "cpu":
    m.num_layers, m.num_heads, m.d_model, m.dropout = 4, 4, 128, 0.0
    c.data.seq_len = m.max_seq_len = 64
    t.batch_size, t.steps, t.lr, t.warmup_steps = 12, 2000, 1e-3, 100
    t.eval_every, t.eval_batches, t.ckpt_every, t.log_every = 250, 20, 500, 50
    t.steps_per_call = 5  # per-call dispatch is host CPU time the 2 devices' cores also need
  elif arg == "baby":
    m.num_layers, m.num_heads, m.d_model, m.dropout = 6, 6, 384, 0.2
    c.data.seq_len = m.max_seq_len = 256
    t.batch_size, t.steps, t.lr, t.warmup_steps = 64, 5000, 1e-3, 100
    t.eval_every, t.eval_batches, t.ckpt_every, t.log_every = 250, 20, 500, 50
  else:
    raise ValueError(f"shakespeare_char.py:{arg}: expected the argument cpu or baby")
  return c
