"""Builds the run's data from the `data` config block: tokenizer, train batches, val batches.

The contract the trainer relies on: `train_batch(step)` returns this host's rows of the
global batch for `step` as numpy arrays (a pure function of seed and step, so a resumed run
sees exactly the batches an uninterrupted one would), and `val_batches()` a fixed list.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lmos_jax.data.text import (ByteTokenizer, CharTokenizer, embedded_corpus, read_text_file,
                                split_train_val, window_batch)


@dataclasses.dataclass
class LMData:
  """Token windows from one corpus, split head/tail into train and validation."""

  tokenizer: Any
  train_ids: np.ndarray
  val_ids: np.ndarray
  batch_size: int  # global
  seq_len: int
  seed: int
  eval_batches: int
  process_index: int = 0
  process_count: int = 1

  def _local(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    per = self.batch_size // self.process_count
    lo = self.process_index * per
    return {k: v[lo:lo + per] for k, v in batch.items()}

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    return self._local(window_batch(self.train_ids, self.batch_size, self.seq_len,
                                    self.seed, step))

  def val_batches(self) -> list[dict[str, np.ndarray]]:
    ids = self.val_ids if len(self.val_ids) > self.seq_len + 1 else self.train_ids
    return [self._local(window_batch(ids, self.batch_size, self.seq_len, self.seed + 1, i))
            for i in range(self.eval_batches)]

  def state(self) -> dict:
    return {}


def build_data(cfg, process_index: int = 0, process_count: int = 1) -> LMData:
  """The data object for `cfg`; errors name the data field to fix."""
  d = cfg.data
  if d.source == "embedded":
    text = embedded_corpus(d.max_chars)
  elif d.source == "text":
    if not d.path:
      raise ValueError("config 'data.path' is empty; set it to a text file for data.source=text")
    text = read_text_file(d.path)
  else:
    raise ValueError(f"config 'data.source'={d.source!r}: expected embedded or text")
  if d.tokenizer == "char":
    tok = CharTokenizer.fit(text)
  elif d.tokenizer == "byte":
    tok = ByteTokenizer()
  else:
    raise ValueError(f"config 'data.tokenizer'={d.tokenizer!r}: expected char or byte")
  train, val = split_train_val(tok.encode(text), d.val_fraction)
  return LMData(tok, train, val, cfg.train.batch_size, d.seq_len, cfg.seed,
                cfg.train.eval_batches, process_index, process_count)
