"""GPT-2 small (124M) for GPUs/TPUs: 12L/12H/768d, block 1024, bf16, fsdp over all devices.

Give a text file (or use the HF pipeline's sources): --config.data.path=corpus.txt
"""

from lmos_jax.config.schema import base_config


def get_config(arg=None):
  c = base_config()
  m, t = c.model, c.train
  m.num_layers, m.num_heads, m.d_model, m.max_seq_len = 12, 12, 768, 1024
  m.vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64
  m.remat = "dots_no_batch"
  c.data.source, c.data.tokenizer, c.data.seq_len = "embedded", "byte", 1024
  c.data.max_chars = 50_000_000
  t.batch_size, t.microbatches, t.steps = 512, 1, 20000
  t.lr, t.warmup_steps, t.schedule, t.min_lr_ratio = 6e-4, 700, "warmup_cosine", 0.1
  t.weight_decay, t.b2, t.precision = 0.1, 0.95, "auto"
  t.eval_every, t.ckpt_every, t.log_every = 1000, 1000, 20
  c.mesh.data, c.mesh.fsdp = 1, -1
  return c
