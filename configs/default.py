"""Tiny GPT on the embedded corpus (the Python stdlib sources): under a minute on 2 CPU cores."""

from lmos_jax.config.schema import base_config


def get_config(arg=None):
  c = base_config()
  c.model.num_layers, c.model.num_heads, c.model.d_model = 2, 4, 128
  c.model.max_seq_len = 128
  c.model.scan_layers = False  # 2 layers: unrolled steps run 1.4x faster on a 2-core CPU
  c.data.source, c.data.tokenizer, c.data.seq_len = "embedded", "byte", 128
  c.train.batch_size, c.train.steps, c.train.lr = 16, 300, 3e-3
  c.train.eval_every, c.train.ckpt_every, c.train.log_every = 100, 100, 10
  c.train.sample_prompt = "def "
  return c
