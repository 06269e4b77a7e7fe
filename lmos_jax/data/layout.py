"""What a config's data pipeline hands the train step, known before the corpus is read.

`batch_spec(cfg)` is the global batch of one step: its keys, shapes and dtypes for each task
and batching. `vocab_size(cfg)` is the number of ids the run's tokenizer emits (what
`model.vocab_size`=0 takes). `lmos plan` compiles the train step from these two without
building the pipeline; tests hold them to what the built pipelines produce.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lmos_jax.data.build import data_tokenizer, source_specs
from lmos_jax.data.encoder import cls_tokenizer, with_mask_token
from lmos_jax.data.interactions import read_catalogue


class ArraySpec(NamedTuple):
  shape: tuple[int, ...]
  dtype: np.dtype


def batch_spec(cfg) -> dict[str, ArraySpec]:
  """One step's global batch for a validated `cfg` (all processes' rows together)."""
  b, t = cfg.train.batch_size, cfg.data.seq_len
  ids, weights = ArraySpec((b, t), np.dtype(np.int32)), ArraySpec((b, t), np.dtype(np.float32))
  if cfg.task == "cls":  # encoder inputs per row, one label per row
    return {"inputs": ids, "token_type_ids": ids, "attention_mask": ids,
            "labels": ArraySpec((b,), np.dtype(np.int32)),
            "weights": ArraySpec((b,), np.dtype(np.float32))}
  d = cfg.data
  if cfg.task == "lm" and d.batching == "packed":  # documents packed with their own positions
    return {"inputs": ids, "targets": ids, "weights": weights, "segment_ids": ids,
            "positions": ids}
  single_random = (d.batching == "random" and not d.streaming
                   and len(source_specs(d)) == 1)
  if cfg.task == "lm" and single_random:  # windows of one stream: every position scores
    return {"inputs": ids, "targets": ids}
  return {"inputs": ids, "targets": ids, "weights": weights}  # windows, mixtures, mlm, rec


def vocab_size(cfg, workdir=None) -> int:
  """Ids the tokenizer of a validated `cfg` emits, [MASK] included for task mlm.

  Fixed by the tokenizer kind or read from its file; the documents are read only when the
  vocabulary depends on them (see `data.build.data_tokenizer`).
  """
  if cfg.task == "rec":  # item rows: the catalogue's items plus padding
    return read_catalogue(cfg.data.catalogue).vocab_size
  tok = cls_tokenizer(cfg) if cfg.task == "cls" else data_tokenizer(cfg, workdir)
  if cfg.task == "mlm":
    tok, _ = with_mask_token(tok)
  return int(tok.vocab_size)
