"""Streaming decoder data (config 'data.streaming'): corpora too large to materialise.

Documents come from `datasets.load_dataset(..., streaming=True)`, split between hosts with
`split_dataset_by_node`, shuffled through a seeded buffer reseeded every epoch, tokenized as
they arrive and packed (first-fit over open rows) or cut into EOS-joined windows on the fly.

The stream is a deterministic function of the seed, so `train_batch(step)` is exact: it
continues the live generator, and a resume (or any step behind the cursor) replays the
stream from the start up to `step`. Replay costs time proportional to the position (reading
and tokenizing what was consumed), which is the price of exactness without storing the
shuffle buffer; the checkpointed state records the step and a fingerprint of data and
tokenizer so a resume on different data fails loudly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from typing import Any, Iterator

import numpy as np

from lmos_jax.config.loading import ConfigError
from lmos_jax.data.packing import first_fit_rows, fixed_windows, rows_to_arrays, split_long
from lmos_jax.data.sources import Repairs, SourceSpec, expand_files, infer_format
from lmos_jax.data.stream import check_state
from lmos_jax.data.tokenizer import pad_id, separator_id, tokenizer_fingerprint

BPE_STREAM_DOCS = 100_000  # a streamed BPE is trained on the first documents of the stream


def open_stream(spec: SourceSpec, split: str, path: str):
  """An IterableDataset of one split (the same builders/hub names as the in-memory path)."""
  import datasets
  kwargs: dict[str, Any] = {"streaming": True, "split": split}
  if spec.kind == "hf":
    name = spec.hf_name
    if spec.hf_config:
      kwargs["name"] = spec.hf_config
  else:
    files = expand_files(path, f"{spec.name}.path")
    fmt = infer_format(files, spec.format, spec.name)
    name = {"tsv": "csv"}.get(fmt, fmt)
    if fmt == "tsv":
      kwargs["delimiter"] = "\t"
  if path:
    kwargs["data_files"] = expand_files(path, f"{spec.name}.path")
  try:
    return datasets.load_dataset(name, **kwargs)
  except (OSError, ValueError) as e:
    raise ConfigError(f"config '{spec.name}' (streaming {name!r}, split {split!r}): datasets "
                      f"could not open it ({e})") from None


def stream_texts(ds, spec: SourceSpec, repairs: Repairs, where: str, chunk: int = 256
                 ) -> Iterator[list[str]]:
  """The text field in chunks of examples (tokenized together); empty ones skipped, counted."""
  empty = seen = 0
  for batch in ds.iter(batch_size=chunk):
    if spec.text_field not in batch:
      raise ConfigError(f"config '{spec.name}.text_field'={spec.text_field!r} is not a field "
                        f"of {where}; its fields are {sorted(batch)}")
    texts = []
    for i, t in enumerate(batch[spec.text_field]):
      if t is not None and not isinstance(t, str):
        raise ConfigError(f"config '{spec.name}.text_field'={spec.text_field!r}: example "
                          f"{seen + i} of {where} is {type(t).__name__}, not text; choose a "
                          "text column")
      if t and t.strip():
        texts.append(t)
      else:
        empty += 1
    seen += len(batch[spec.text_field])
    if texts:
      yield texts
  repairs.note("empty documents skipped", empty, f"{where} (streamed)")


def _split_rows(rows: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
  """Each row of a (N, seq_len) block as its own dict."""
  for r in range(len(next(iter(rows.values())))):
    yield {k: v[r] for k, v in rows.items()}


@dataclasses.dataclass
class StreamingData:
  """Batches of packed or windowed rows from a streamed dataset (see the module docstring)."""

  tokenizer: Any
  spec: SourceSpec
  local_batch: int
  seq_len: int
  seed: int
  eval_batches: int
  batching: str
  val_fraction: float
  shuffle_buffer: int
  process_index: int = 0
  process_count: int = 1
  repairs: Repairs = dataclasses.field(default_factory=Repairs)
  _gen: Iterator | None = dataclasses.field(default=None, repr=False)
  _next: int = 0
  _last: dict | None = dataclasses.field(default=None, repr=False)
  _val: list | None = dataclasses.field(default=None, repr=False)
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

  def _split(self, train: bool):
    """This host's train (shuffled per epoch) or validation examples."""
    from datasets.distributed import split_dataset_by_node
    s = self.spec
    holdout = 0
    if train or not (s.hf_val_split or s.val_path):
      ds = open_stream(s, s.hf_split if s.kind == "hf" else "train", s.path)
      if not (s.hf_val_split or s.val_path) and self.val_fraction > 0:
        holdout = max(2, round(1 / self.val_fraction))  # every k-th document validates
    elif s.hf_val_split:
      ds = open_stream(s, s.hf_val_split, s.path)
    else:
      ds = open_stream(s, "train", s.val_path)
    if holdout:
      keep_val = not train
      ds = ds.filter(lambda ex, i: (i % holdout == 0) == keep_val, with_indices=True)
    if self.process_count > 1:
      ds = split_dataset_by_node(ds, rank=self.process_index, world_size=self.process_count)
    return ds

  def _docs(self, train: bool) -> Iterator[np.ndarray]:
    """Token documents (each ending in EOS), epoch after epoch for training."""
    eos, where = separator_id(self.tokenizer), self.spec.path or self.spec.hf_name
    epoch = 0
    while True:
      ds = self._split(train)
      if train and self.shuffle_buffer > 0:
        ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        ds.set_epoch(epoch)
      n = 0
      for texts in stream_texts(ds, self.spec, self.repairs, where):
        n += len(texts)
        for ids in self.tokenizer.encode_batch(texts):
          yield np.append(ids, np.int32(eos)).astype(np.int32)
      if n == 0:
        raise ConfigError(f"config '{self.spec.name}' ({where}) streamed no non-empty "
                          f"documents for process {self.process_index}; give data with text")
      if not train:
        return
      epoch += 1

  def _rows(self, docs: Iterator[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """Rows as documents arrive: first-fit over 64 open rows, or EOS-joined windows (each
    full window as soon as its tokens are in, the last one padded)."""
    pad, L = pad_id(self.tokenizer), self.seq_len
    if self.batching == "windows":
      buf = np.zeros((0,), np.int32)
      for d in docs:
        buf = np.concatenate([buf, d])
        full = (len(buf) - 1) // L
        if full:
          yield from _split_rows(fixed_windows(buf[:full * L + 1], L, pad))
          buf = buf[full * L:]
      if len(buf) > 1:
        yield from _split_rows(fixed_windows(buf, L, pad))
      return
    pieces = (piece for d in docs for piece in split_long(d, L))
    for row in first_fit_rows(pieces, L):
      yield from _split_rows(rows_to_arrays([row], L, pad))

  def _batches(self) -> Iterator[dict[str, np.ndarray]]:
    rows = self._rows(self._docs(train=True))
    while True:
      got = [next(rows) for _ in range(self.local_batch)]
      yield {k: np.stack([r[k] for r in got]) for k in got[0]}

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    """Batch `step`: continues the live stream, or replays it from the start if behind."""
    with self._lock:
      if self._gen is None or step < self._next - 1:
        self._gen, self._next = self._batches(), 0
      while self._next <= step:
        self._last = next(self._gen)
        self._next += 1
      return self._last

  def val_batches(self) -> list[dict[str, np.ndarray]]:
    """The first validation rows, streamed once and kept (every eval uses the same)."""
    if self._val is None:
      self._val = self._read_val()
    return self._val

  def _read_val(self) -> list[dict[str, np.ndarray]]:
    rows = list(self._rows(self._docs(train=False)))
    if not rows:
      raise ConfigError(f"config '{self.spec.name}': no validation rows on process "
                        f"{self.process_index}; give a validation split or more data")
    need = self.eval_batches * self.local_batch
    rows = [rows[i % len(rows)] for i in range(need)]
    return [{k: np.stack([r[k] for r in rows[b * self.local_batch:(b + 1) * self.local_batch]])
             for k in rows[0]} for b in range(self.eval_batches)]

  def state(self, step: int = 0) -> dict:
    h = hashlib.sha256(json.dumps([tokenizer_fingerprint(self.tokenizer),
                                   dataclasses.asdict(self.spec),
                                   self.shuffle_buffer, self.val_fraction],
                                  sort_keys=True).encode())
    return {"kind": f"stream-{self.batching}", "step": int(step), "seed": self.seed,
            "fingerprint": h.hexdigest()[:16]}

  def restore(self, state: dict, step: int) -> None:
    check_state(self.state(step), state)


def first_texts(spec: SourceSpec, n: int, repairs: Repairs) -> list[str]:
  """The first `n` documents of the (unshuffled, unsharded) train stream: BPE training."""
  ds = open_stream(spec, spec.hf_split if spec.kind == "hf" else "train", spec.path)
  out = []
  for texts in stream_texts(ds, spec, repairs, spec.path or spec.hf_name):
    out += texts
    if len(out) >= n:
      break
  return out[:n]
