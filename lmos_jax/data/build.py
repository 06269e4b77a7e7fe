"""Builds the run's data from the `data` config block: tokenizer, train batches, val batches.

The contract the trainer relies on: `train_batch(step)` returns this host's rows of the
global batch for `step` as numpy arrays, a pure function of (seed, step, data), so a resumed
run sees exactly the batches an uninterrupted one would; `val_batches()` a fixed list;
`state(step)` the JSON-able stream state stored in checkpoints and checked by `restore`;
`lmos_jax.data.stream.BatchStream` produces them ahead in a background thread.

Batching (config 'data.batching'):
  random   random windows of the EOS-joined corpus (`text.window_batch`; every host draws the
           same global batch and keeps its rows);
  windows  the EOS-joined stream cut into consecutive fixed windows, reshuffled every epoch;
  packed   documents packed first-fit into rows with segment ids and per-segment positions.
For windows/packed each host tokenizes and keeps only its shard of the documents
(documents i::process_count; rows i::process_count when a source has fewer documents than
hosts). Several sources mix by weight: each step's rows are split between sources by a
multinomial draw seeded by (seed, step). `data.streaming` hands files/hf sources to
`lmos_jax.data.streaming.StreamingData` instead (nothing materialised).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from lmos_jax.config.schema import special_set
from lmos_jax.data.encoder import local_rows
from lmos_jax.data.errors import DataError
from lmos_jax.data.packing import first_fit_pack, fixed_windows, join_with_eos, split_long
from lmos_jax.data.stream import check_state
from lmos_jax.data.sources import Repairs, SourceSpec, read_documents, split_documents
from lmos_jax.data.text import check_long_enough, split_train_val, window_batch
from lmos_jax.data.tokenizer import build_tokenizer, pad_id, separator_id, tokenizer_fingerprint

log = logging.getLogger("lmos_jax.data")


@dataclasses.dataclass
class LMData:
  """Random token windows from one corpus, split head/tail into train and validation."""

  tokenizer: Any
  train_ids: np.ndarray
  val_ids: np.ndarray
  batch_size: int  # global
  seq_len: int
  seed: int
  eval_batches: int
  process_index: int = 0
  process_count: int = 1
  repairs: Repairs = dataclasses.field(default_factory=Repairs)

  def _local(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return local_rows(batch, self.process_index, self.process_count)

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    return self._local(window_batch(self.train_ids, self.batch_size, self.seq_len,
                                    self.seed, step))

  def val_batches(self) -> list[dict[str, np.ndarray]]:
    ids = self.val_ids if len(self.val_ids) > self.seq_len + 1 else self.train_ids
    return [self._local(window_batch(ids, self.batch_size, self.seq_len, self.seed + 1, i))
            for i in range(self.eval_batches)]

  def state(self, step: int = 0) -> dict:
    return {"kind": "random", "step": int(step), "seed": self.seed,
            "fingerprint": self.fingerprint}

  @functools.cached_property
  def fingerprint(self) -> str:
    return digest([self.train_ids], self.tokenizer)

  def restore(self, state: dict, step: int) -> None:
    check_state(self.state(step), state)



@dataclasses.dataclass
class RowSource:
  """One source's rows on this host: train rows reshuffled each epoch, fixed val rows."""

  name: str
  train: dict[str, np.ndarray]  # (N, seq_len) each
  val: dict[str, np.ndarray]
  weight: float

  @property
  def num_rows(self) -> int:
    return len(self.train["inputs"])

  def rows(self, start: int, count: int, seed: int, index: int) -> dict[str, np.ndarray]:
    """Rows start..start+count of the endless stream: epoch e is permutation (seed, e)."""
    r = np.arange(start, start + count)
    epochs, pos = r // self.num_rows, r % self.num_rows
    idx = np.empty_like(r)
    for e in np.unique(epochs):
      perm = np.random.default_rng([seed, index, int(e)]).permutation(self.num_rows)
      idx[epochs == e] = perm[pos[epochs == e]]
    return {k: v[idx] for k, v in self.train.items()}


@dataclasses.dataclass
class RandomSource:
  """A source in a mixture with random batching: row r is a window at a (seed, r) offset."""

  name: str
  ids: np.ndarray
  val: dict[str, np.ndarray]
  weight: float
  seq_len: int

  @property
  def num_rows(self) -> int:
    return max(1, (len(self.ids) - 1) // self.seq_len)

  def rows(self, start: int, count: int, seed: int, index: int) -> dict[str, np.ndarray]:
    hi = len(self.ids) - self.seq_len - 1
    starts = np.asarray([np.random.default_rng([seed, index, r]).integers(0, hi)
                         for r in range(start, start + count)], np.int64)
    idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
    chunk = self.ids[idx].astype(np.int32)
    return {"inputs": chunk[:, :-1], "targets": chunk[:, 1:],
            "weights": np.ones((count, self.seq_len), np.float32)}

  @property
  def train(self) -> dict[str, np.ndarray]:
    return {"inputs": self.ids[None]}


@dataclasses.dataclass
class MixtureData:
  """Rows from one or more sources, mixed by weight, as a pure function of (seed, step)."""

  tokenizer: Any
  sources: list
  local_batch: int
  seq_len: int
  seed: int
  eval_batches: int
  batching: str
  repairs: Repairs
  _cum: np.ndarray = dataclasses.field(default=None, repr=False)
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

  def step_counts(self, step: int) -> np.ndarray:
    """Rows each source gives at `step` (all of them for a single source)."""
    if len(self.sources) == 1:
      return np.asarray([self.local_batch])
    w = np.asarray([s.weight for s in self.sources], np.float64)
    rng = np.random.default_rng([self.seed, int(step), 0x6D6978])
    return rng.multinomial(self.local_batch, w / w.sum())

  def consumed(self, step: int) -> np.ndarray:
    """Rows each source has given before `step` (a cumulative table, extended lazily)."""
    with self._lock:
      have = 0 if self._cum is None else len(self._cum) - 1
      if self._cum is None or step > have:
        new = max(step, 2 * have, 64)
        counts = np.stack([self.step_counts(s) for s in range(have, new)])
        base = (np.zeros((1, len(self.sources)), np.int64) if self._cum is None
                else self._cum)
        self._cum = np.concatenate([base, base[-1] + np.cumsum(counts, 0)])
      return self._cum[step].copy()

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    start, counts = self.consumed(step), self.step_counts(step)
    parts = [src.rows(int(start[i]), int(counts[i]), self.seed, i)
             for i, src in enumerate(self.sources) if counts[i]]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if len(self.sources) > 1:  # interleave sources within the batch
      order = np.random.default_rng([self.seed, int(step), 0x706572]).permutation(
          self.local_batch)
      batch = {k: v[order] for k, v in batch.items()}
    return batch

  def val_batches(self) -> list[dict[str, np.ndarray]]:
    """The first rows of every source's validation rows, round-robin, cycled if short."""
    n = self.eval_batches * self.local_batch
    vals = [s.val for s in self.sources if len(s.val["inputs"])]
    if not vals:  # val_fraction 0 and no validation split: evaluate on training rows
      log.warning("data: no validation rows; evaluating on the first training rows")
      vals = [s.rows(0, n, self.seed, i) for i, s in enumerate(self.sources)]
    picks = [(i % len(vals), (i // len(vals)) % len(vals[i % len(vals)]["inputs"]))
             for i in range(n)]
    rows = {k: np.stack([vals[s][k][r] for s, r in picks]) for k in vals[0]}
    return [{k: v[b * self.local_batch:(b + 1) * self.local_batch] for k, v in rows.items()}
            for b in range(self.eval_batches)]

  def state(self, step: int = 0) -> dict:
    """Where the stream stands after `step` steps: per-source rows consumed and epochs."""
    used = self.consumed(step)
    return {"kind": self.batching, "step": int(step), "seed": self.seed,
            "rows_consumed": [int(u) for u in used],
            "epoch": [int(u) // s.num_rows for u, s in zip(used, self.sources)],
            "rows_per_epoch": [s.num_rows for s in self.sources],
            "fingerprint": self.fingerprint}

  @functools.cached_property
  def fingerprint(self) -> str:
    return digest([s.train["inputs"] for s in self.sources], self.tokenizer)

  def restore(self, state: dict, step: int) -> None:
    check_state(self.state(step), state)



def digest(arrays: list[np.ndarray], tok) -> str:
  """Hash of the token rows and the tokenizer: equal iff a resume sees the same stream."""
  h = hashlib.sha256(tokenizer_fingerprint(tok).encode())
  for a in arrays:
    h.update(str(a.shape).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def source_specs(d) -> list[SourceSpec]:
  """The `data` block's source, or its `mixture` entries (missing fields from the block)."""
  def spec(entry: dict, name: str) -> SourceSpec:
    get = lambda k: entry.get(k, d[k]) if k != "weight" else entry.get("weight", 1.0)
    return SourceSpec(kind=get("source"), path=get("path"), format=get("format"),
                      text_field=get("text_field"), hf_name=get("hf_name"),
                      hf_config=get("hf_config"), hf_split=get("hf_split"),
                      hf_val_split=get("hf_val_split"), val_path=get("val_path"),
                      weight=float(get("weight")), max_chars=d.max_chars, name=name)
  if not d.mixture:
    return [spec({}, "data")]
  return [spec(dict(entry), f"data.mixture[{i}]") for i, entry in enumerate(d.mixture)]


def doc_tokens(tok, docs: list[str], eos: int | None) -> list[np.ndarray]:
  ids = tok.encode_batch(docs)
  if eos is None:
    return ids
  return [np.concatenate([d, np.asarray([eos], np.int32)]) for d in ids]


def host_rows(rows: dict[str, np.ndarray], process_index: int, process_count: int
              ) -> dict[str, np.ndarray]:
  return {k: v[process_index::process_count] for k, v in rows.items()}


def make_rows(tok, docs: list[str], batching: str, seq_len: int, repairs: Repairs, where: str
              ) -> dict[str, np.ndarray]:
  """Windows or packed rows of these documents."""
  eos, pad = separator_id(tok), pad_id(tok)
  ids = doc_tokens(tok, docs, eos)
  if batching == "windows":
    return fixed_windows(join_with_eos([d[:-1] for d in ids], eos), seq_len, pad)
  pieces: list[np.ndarray] = []
  n_long = 0
  for d in ids:
    split = split_long(d, seq_len)
    n_long += len(split) > 1
    pieces += split
  repairs.note(f"documents longer than the window (seq_len={seq_len}) split into pieces",
               n_long, where)
  return first_fit_pack(pieces, seq_len, pad)


# (train documents, validation documents or None) per source
Splits = list[tuple[list[str], list[str] | None]]


def build_data(cfg, process_index: int = 0, process_count: int = 1,
               workdir: str | Path | None = None, tokenizer=None):
  """The data object for a validated `cfg`; errors name the data field to fix.

  `workdir` holds the BPE tokenizer cache (WORKDIR/tokenizer/), so a resume reuses it.
  `tokenizer`: use this one (a trained run's, read back from its workdir) instead of building
  one from the data, so the ids are the ones the run's model was trained on.
  """
  d = cfg.data
  repairs = Repairs()
  specs = source_specs(d)
  if d.streaming:
    return build_streaming(cfg, specs[0], process_index, process_count, workdir, repairs,
                           tokenizer)
  splits = read_splits(d, specs, repairs)
  tok = tokenizer or corpus_tokenizer(cfg, splits, workdir)
  check_encodable(tok, {val_origin(s): val for (_, val), s in zip(splits, specs) if val},
                  cfg.train.sample_prompt if cfg.train.sample_tokens > 0 else "")
  seq_len = d.seq_len
  if d.batching == "random" and len(specs) == 1:
    train_ids, val_ids = token_streams(tok, *splits[0], d.val_fraction)
    check_long_enough(train_ids, seq_len, specs[0].name)
    log_repairs(repairs)
    return LMData(tok, train_ids, val_ids, cfg.train.batch_size, seq_len, cfg.seed,
                  cfg.train.eval_batches, process_index, process_count, repairs)
  sources = []
  for (docs, val), s in zip(splits, specs):
    sources.append(source_rows(s, docs, val, tok, d, process_index, process_count, repairs))
  log_repairs(repairs)
  return MixtureData(tok, sources, cfg.train.batch_size // process_count, seq_len, cfg.seed,
                     cfg.train.eval_batches, d.batching, repairs)


def read_splits(d, specs: list[SourceSpec], repairs: Repairs) -> Splits:
  """(train documents, validation documents or None for a single text) per source."""
  splits = []
  for s in specs:
    docs, val = read_documents(s, repairs)
    if val is None and len(docs) > 1:
      docs, val = split_documents(docs, d.val_fraction)
    splits.append((docs, val))
  return splits


def needs_specials(d, splits: Splits) -> bool:
  """char/byte vocabularies get EOS/PAD/BOS when documents are joined, packed or mixed; a
  single text in random windows keeps the bare vocabulary."""
  multi_doc = any(len(docs) + len(val or ()) > 1 for docs, val in splits)
  return multi_doc or d.batching != "random" or len(splits) > 1


def corpus_tokenizer(cfg, splits: Splits, workdir: str | Path | None):
  """The tokenizer `data.tokenizer` names, fitted (char) or trained (bpe) on the train split,
  with the special set the task needs (`data.specials`); a pretrained one without
  `data.tokenizer_path` is the `model.init_from` source's."""
  d = cfg.data
  return build_tokenizer(d.tokenizer, [t for docs, _ in splits for t in docs],
                         need_specials=needs_specials(d, splits),
                         tokenizer_path=d.tokenizer_path or cfg.model.init_from,
                         bpe_vocab_size=d.bpe_vocab_size, cache_dir=tokenizer_cache(workdir),
                         specials=special_set(d.specials, cfg.task))


def tokenizer_cache(workdir: str | Path | None) -> Path | None:
  return Path(workdir) / "tokenizer" if workdir else None


def data_tokenizer(cfg, workdir: str | Path | None = None):
  """The tokenizer `build_data` builds for `cfg`, reading documents only when it depends on
  them: char and bpe vocabularies, and byte's specials for a single file or dataset source
  in random windows (one document or several decides them)."""
  d = cfg.data
  specs = source_specs(d)
  if d.streaming:
    return streaming_tokenizer(cfg, specs[0], workdir)
  if d.tokenizer == "pretrained" or (d.tokenizer == "byte" and (
      d.batching != "random" or len(specs) > 1 or specs[0].kind == "embedded")):
    # the embedded corpus is one text; joined, packed or mixed documents need the specials
    specials = d.batching != "random" or len(specs) > 1
    return build_tokenizer(d.tokenizer, [], need_specials=specials,
                           tokenizer_path=d.tokenizer_path or cfg.model.init_from,
                           specials=special_set(d.specials, cfg.task))
  return corpus_tokenizer(cfg, read_splits(d, specs, Repairs()), workdir)


def val_origin(s: SourceSpec) -> str:
  """Where a source's validation documents come from, naming the config field."""
  if s.val_path:
    return f"config '{s.name}.val_path'"
  if s.kind == "hf" and s.hf_val_split:
    return f"config '{s.name}.hf_val_split'"
  return f"the validation documents data.val_fraction holds out of config '{s.name}.path'"


def check_encodable(tok, val_docs: dict[str, list[str]], sample_prompt: str) -> None:
  """A char vocabulary is fitted on the training text: validation documents or the end-of-run
  sample prompt with other characters cannot be encoded. Checked here, naming the field,
  before anything compiles (the prompt would otherwise fail only after training)."""
  unknown_chars = getattr(tok, "unknown_chars", None)
  if unknown_chars is None:  # byte, BPE and pretrained tokenizers encode any text
    return
  for origin, docs in val_docs.items():
    unknown = sorted({c for doc in docs for c in unknown_chars(doc)})
    if unknown:
      raise DataError(f"{origin}: {tok.unknown_message(unknown)}")
  if unknown_chars(sample_prompt):
    raise DataError(f"config 'train.sample_prompt'={sample_prompt!r}: "
                    f"{tok.unknown_message(unknown_chars(sample_prompt))}")


def token_streams(tok, docs: list[str], val: list[str] | None,
                  val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """A source's train and validation tokens as two streams: a single text (`val` None) split
  head/tail (the last `val_fraction` validates), else the documents of each split joined
  with the separator (no validation documents: an empty stream)."""
  if val is None:
    return split_train_val(tok.encode(docs[0]), val_fraction)
  eos = separator_id(tok)
  train_ids = join_with_eos(tok.encode_batch(docs), eos)
  return train_ids, (join_with_eos(tok.encode_batch(val), eos) if val else train_ids[:0])


def source_rows(s: SourceSpec, docs: list[str], val: list[str] | None, tok, d,
                process_index: int, process_count: int, repairs: Repairs):
  """One source's train and validation rows on this host (see the module docstring)."""
  seq_len, where = d.seq_len, s.path or s.hf_name or s.kind
  if val is None or d.batching == "random":
    train_ids, val_ids = token_streams(tok, docs, val, d.val_fraction)
  if d.batching == "random":
    check_long_enough(train_ids, seq_len, s.name)
    vrows = rows_from_ids(val_ids, "windows", seq_len, tok)
    return RandomSource(s.name, train_ids, shard_val(vrows, process_index, process_count),
                        s.weight, seq_len)
  if val is None:
    train = host_rows(rows_from_ids(train_ids, d.batching, seq_len, tok), process_index,
                      process_count)
    vrows = rows_from_ids(val_ids, d.batching, seq_len, tok)
  else:
    if len(docs) >= process_count:  # each host tokenizes only its documents
      train = make_rows(tok, docs[process_index::process_count], d.batching, seq_len,
                        repairs, where)
    else:
      train = host_rows(make_rows(tok, docs, d.batching, seq_len, repairs, where),
                        process_index, process_count)
    vrows = (make_rows(tok, val, d.batching, seq_len, repairs, f"{where} (validation)")
             if val else rows_from_ids(np.zeros((0,), np.int32), d.batching, seq_len, tok))
  if not len(train["inputs"]):
    raise DataError(f"config '{s.name}' gives this host (process {process_index} of "
                    f"{process_count}) no training rows; give more data or shorten "
                    "data.seq_len")
  return RowSource(s.name, train, shard_val(vrows, process_index, process_count), s.weight)


def shard_val(rows: dict[str, np.ndarray], process_index: int, process_count: int
              ) -> dict[str, np.ndarray]:
  """This host's validation rows; all of them when there are fewer rows than hosts."""
  if len(rows["inputs"]) >= process_count:
    return host_rows(rows, process_index, process_count)
  return rows


def build_streaming(cfg, spec: SourceSpec, process_index: int, process_count: int,
                    workdir, repairs: Repairs, tokenizer=None):
  """StreamingData for one files/hf source (see lmos_jax.data.streaming)."""
  from lmos_jax.data.streaming import StreamingData
  d = cfg.data
  tok = tokenizer or streaming_tokenizer(cfg, spec, workdir)
  return StreamingData(tok, spec, cfg.train.batch_size // process_count, d.seq_len, cfg.seed,
                       cfg.train.eval_batches, d.batching, d.val_fraction, d.shuffle_buffer,
                       process_index, process_count, repairs)


def streaming_tokenizer(cfg, spec: SourceSpec, workdir):
  """A streamed source's tokenizer: bpe trains on the first documents of the stream."""
  from lmos_jax.data.streaming import BPE_STREAM_DOCS, first_texts
  d = cfg.data
  train_docs = first_texts(spec, BPE_STREAM_DOCS, Repairs()) if d.tokenizer == "bpe" else []
  return build_tokenizer(d.tokenizer, train_docs, need_specials=True,
                         tokenizer_path=d.tokenizer_path or cfg.model.init_from,
                         bpe_vocab_size=d.bpe_vocab_size, cache_dir=tokenizer_cache(workdir),
                         specials=special_set(d.specials, cfg.task))


def rows_from_ids(ids: np.ndarray, batching: str, seq_len: int, tok) -> dict[str, np.ndarray]:
  """Rows of one long token stream (a single-text source): fixed windows either way; packed
  adds one segment per row so the keys match packed documents."""
  if len(ids) < 2:
    keys = ("inputs", "targets", "weights") + (("segment_ids", "positions")
                                               if batching == "packed" else ())
    return {k: np.zeros((0, seq_len), np.float32 if k == "weights" else np.int32)
            for k in keys}
  rows = fixed_windows(ids, seq_len, pad_id(tok))
  if batching == "packed":
    n = len(rows["inputs"])
    rows["segment_ids"] = rows["weights"].astype(np.int32)
    rows["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                        (n, seq_len)) * rows["segment_ids"]
  return rows


def log_repairs(repairs: Repairs) -> None:
  if repairs:
    log.warning("data repairs: %s", dict(repairs))
