"""Small shared builders for tests: tiny configs and models."""

from __future__ import annotations

from lmos_jax.config.schema import base_config
from lmos_jax.models.layers import TransformerConfig


def tiny_tcfg(**overrides) -> TransformerConfig:
  kw = dict(vocab_size=61, num_layers=2, num_heads=4, d_model=32, d_ff=64, max_seq_len=16)
  kw.update(overrides)
  return TransformerConfig(**kw)


def tiny_config(**train_overrides):
  """A run config small enough for a unit test on 8 simulated devices."""
  c = base_config()
  c.model.num_layers, c.model.num_heads, c.model.d_model, c.model.max_seq_len = 2, 4, 32, 16
  c.data.seq_len, c.data.max_chars = 16, 50_000
  c.train.batch_size, c.train.steps, c.train.warmup_steps = 8, 4, 1
  c.train.eval_every = c.train.ckpt_every = c.train.log_every = 2
  c.train.eval_batches, c.train.sample_tokens, c.train.progress = 1, 0, False
  for k, v in train_overrides.items():
    c.train[k] = v
  return c
