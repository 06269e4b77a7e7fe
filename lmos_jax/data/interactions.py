"""User behaviour for next-item recommendation: interaction logs, the item catalogue, and the
training batches of the `rec` task.

Files are TSV. Interactions: `user<TAB>item[<TAB>timestamp]`; items: `item<TAB>title[<TAB>
genres]`; dev targets: `user<TAB>item`; candidates: `user<TAB>space-separated item ids`. A
first row naming the columns (`user`, `item`, ...) is a header and is skipped. Item ids are
strings; the catalogue maps them to rows 1..N of the model's item table (0 is padding).

A user's history is their interactions in file order, each file sorted by (timestamp, item)
when it has timestamps (MovieLens rates many films within one second: the item id breaks ties
the same way on every machine). Batches are pure functions of (seed, step): resuming is exact.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from lmos_jax.config.datadir import missing_hint
from lmos_jax.config.loading import ConfigError
from lmos_jax.data.encoder import (bucket_widths, cut_to_fit, local_rows, rows_for_step,
                                   sorted_windows)
from lmos_jax.data.errors import DataError, DataFileNotFoundError
from lmos_jax.data.stream import check_state

PAD = 0  # row 0 of the item table: padding, never recommended


def _rows(path: str | Path, field: str, min_cols: int) -> list[tuple[int, list[str]]]:
  """(line number, columns) of a TSV file, its header (a first row naming 'user' or 'item')
  skipped and blank lines ignored; a row with fewer than `min_cols` columns is an error."""
  p = Path(path)
  if not p.is_file():
    raise DataFileNotFoundError(f"{field}={str(path)!r}: no such file; {missing_hint(field)}")
  out = []
  with open(p, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      cols = line.rstrip("\r\n").split("\t")
      if not line.strip():
        continue
      if n == 1 and cols[0].strip().lower() in ("user", "item", "user_id", "item_id"):
        continue
      if len(cols) < min_cols or not all(c.strip() for c in cols[:min_cols]):
        raise DataError(f"{p}:{n}: expected {min_cols} tab-separated columns, got "
                        f"{line.rstrip()!r}")
      out.append((n, [c.strip() for c in cols]))
  return out


@dataclasses.dataclass(frozen=True)
class Catalogue:
  """The items a model knows: ids (row i+1 of the item table is ids[i]), their texts, and
  how often each was interacted with in training (for popularity and cold-item reports)."""

  ids: tuple[str, ...]
  texts: tuple[str, ...]
  counts: tuple[int, ...] = ()

  @property
  def vocab_size(self) -> int:
    """Rows of the item table: every item plus the padding row."""
    return len(self.ids) + 1

  def index(self) -> dict[str, int]:
    return {item: i + 1 for i, item in enumerate(self.ids)}

  def popularity_order(self) -> np.ndarray:
    """Item rows, most interacted first (ties: catalogue order)."""
    counts = np.asarray(self.counts or [0] * len(self.ids))
    return np.argsort(-counts, kind="stable") + 1

  def describe(self) -> dict:
    return {"kind": "items", "ids": list(self.ids), "texts": list(self.texts),
            "counts": list(self.counts)}

  @classmethod
  def from_info(cls, info: dict) -> "Catalogue":
    return cls(tuple(info["ids"]), tuple(info["texts"]), tuple(info.get("counts", ())))


def read_catalogue(path: str | Path, field: str = "data.catalogue") -> Catalogue:
  """Items file -> Catalogue; an item's text is `title | genre, genre` (the text the
  encoder reads). A repeated item id is an error naming its line."""
  ids, texts, seen = [], [], {}
  for n, cols in _rows(path, field, 1):
    if cols[0] in seen:
      raise DataError(f"{path}:{n}: item {cols[0]!r} already listed on line {seen[cols[0]]}")
    seen[cols[0]] = n
    title = cols[1] if len(cols) > 1 else cols[0]
    genres = cols[2].replace("|", ", ") if len(cols) > 2 and cols[2] else ""
    ids.append(cols[0])
    texts.append(f"{title} | {genres}" if genres else title)
  if not ids:
    raise DataError(f"{field}={str(path)!r}: no items")
  return Catalogue(tuple(ids), tuple(texts))


def read_histories(paths: Sequence[str | Path], index: dict[str, int],
                   field: str = "data.train") -> dict[str, list[int]]:
  """Each user's item rows in order: the files one after another, each sorted by
  (timestamp, item id) when it has a timestamp column. An item missing from the catalogue
  is an error naming the file and line."""
  out: dict[str, list[int]] = {}
  for path in paths:
    rows = []
    for n, cols in _rows(path, field, 2):
      if cols[1] not in index:
        raise DataError(f"{path}:{n}: item {cols[1]!r} is not in the item catalogue")
      ts = _number(cols[2], path, n) if len(cols) > 2 and cols[2] else 0.0
      rows.append((cols[0], ts, _sort_key(cols[1]), index[cols[1]]))
    rows.sort(key=lambda r: (r[1], r[2]))  # stable: users' rows keep file order on ties
    for user, _, _, item in rows:
      out.setdefault(user, []).append(item)
  return out


def _number(text: str, path, n: int) -> float:
  try:
    return float(text)
  except ValueError:
    raise DataError(f"{path}:{n}: timestamp {text!r} is not a number (unix seconds)") from None


def _sort_key(item: str) -> tuple:
  """Numeric ids in numeric order, others after them in string order."""
  return (0, int(item), "") if item.isdigit() else (1, 0, item)


def read_targets(path: str | Path, index: dict[str, int], field: str = "data.dev"
                 ) -> dict[str, int]:
  """user -> held-out item row (one per user)."""
  out = {}
  for n, cols in _rows(path, field, 2):
    if cols[1] not in index:
      raise DataError(f"{path}:{n}: item {cols[1]!r} is not in the item catalogue")
    out[cols[0]] = index[cols[1]]
  return out


def read_candidates(path: str | Path, index: dict[str, int], field: str = "--candidates"
                    ) -> dict[str, list[int]]:
  """user -> candidate item rows, from `user<TAB>item item ...` rows."""
  out = {}
  for n, cols in _rows(path, field, 2):
    items = cols[1].split()
    unknown = [i for i in items if i not in index]
    if unknown:
      raise DataError(f"{path}:{n}: item {unknown[0]!r} is not in the model's item catalogue")
    out[cols[0]] = [index[i] for i in items]
  return out


def counts_from(histories: dict[str, list[int]], vocab_size: int) -> np.ndarray:
  """Interactions per item row (row 0 included, always 0)."""
  counts = np.zeros(vocab_size, np.int64)
  for items in histories.values():
    np.add.at(counts, items, 1)
  return counts


def history_window(items: Sequence[int], seq_len: int) -> np.ndarray:
  """The last `seq_len` items, right-padded with PAD (position 0 = the oldest kept)."""
  tail = np.asarray(items[-seq_len:], np.int32)
  return np.pad(tail, (0, seq_len - len(tail)))


def next_item_rows(items: Sequence[int], seq_len: int) -> dict[str, np.ndarray]:
  """One training row: at each position the next item is the target (the last seq_len+1
  items of the history: inputs = all but the last, targets = all but the first)."""
  window = list(items[-(seq_len + 1):])
  inputs, targets = history_window(window[:-1], seq_len), history_window(window[1:], seq_len)
  return {"inputs": inputs, "targets": targets,
          "weights": (targets != PAD).astype(np.float32)}


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def dev_row(items: Sequence[int], target: int, seq_len: int) -> dict[str, np.ndarray]:
  """One eval row: the history's last seq_len items in, the held-out item the target at
  the last real position (weight 1 there only)."""
  inputs = history_window(items, seq_len)
  targets = np.zeros_like(inputs)
  weights = np.zeros(seq_len, np.float32)
  last = min(len(items), seq_len) - 1
  targets[last], weights[last] = target, 1.0
  return {"inputs": inputs, "targets": targets, "weights": weights}


@dataclasses.dataclass
class RecData:
  """Users' histories as next-item training rows, and the dev targets as eval rows.

  A row is a user's latest `seq_len`+1 items, shifted by one; each epoch visits every user
  once in a fresh order seeded by (seed, epoch). Users of similar history length share
  batches (sorted within windows of `sort_window` batches) and each batch is cut to the
  narrowest of `widths` holding its longest history: histories are right-padded and
  attention is causal, so the cut columns are padding that no real position sees.
  """

  catalogue: Catalogue
  users: list[str]
  histories: list[list[int]]
  dev_targets: list[int]  # PAD for a user without one
  seq_len: int
  batch_size: int
  seed: int
  process_index: int = 0
  process_count: int = 1
  widths: tuple[int, ...] = ()  # empty: seq_len only
  sort_window: int = 0

  def __post_init__(self):
    self.train = stack_rows([next_item_rows(h, self.seq_len) for h in self.histories])
    self.train_lengths = (self.train["weights"] > 0).sum(1)
    self._epoch_cache: dict[int, np.ndarray] = {}

  @property
  def tokenizer(self) -> Catalogue:
    """What the trainer sizes the model's table from (item rows, not text tokens)."""
    return self.catalogue

  def epoch_order(self, epoch: int) -> np.ndarray:
    if epoch not in self._epoch_cache:
      rng = np.random.default_rng([self.seed, epoch, 0x726563])
      order = sorted_windows(rng.permutation(len(self.users)), self.train_lengths,
                             self.batch_size, self.sort_window, rng)
      self._epoch_cache = {epoch: order}
    return self._epoch_cache[epoch]

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    idx = rows_for_step(step, self.batch_size, len(self.users), self.epoch_order)
    batch = cut_to_fit({k: v[idx] for k, v in self.train.items()}, self.train_lengths[idx],
                       self.widths)
    return local_rows(batch, self.process_index, self.process_count)

  def val_batches(self) -> list[dict[str, np.ndarray]]:
    """Every user with a dev target once, shortest history first (less padding); the last
    batch filled with copies of its first row at weight 0."""
    users = [u for u, t in enumerate(self.dev_targets) if t != PAD]
    users.sort(key=lambda u: len(self.histories[u]))
    out, b = [], self.batch_size
    for lo in range(0, len(users), b):
      idx = users[lo:lo + b]
      real = np.arange(b) < len(idx)
      idx = idx + [idx[0]] * (b - len(idx))
      batch = stack_rows([dev_row(self.histories[u], self.dev_targets[u], self.seq_len)
                          for u in idx])
      batch["weights"] = batch["weights"] * real[:, None]
      lengths = np.minimum([len(self.histories[u]) for u in idx], self.seq_len)
      out.append(local_rows(cut_to_fit(batch, lengths, self.widths), self.process_index,
                            self.process_count))
    return out

  def state(self, step: int = 0) -> dict:
    h = hashlib.sha256(np.ascontiguousarray(self.train["inputs"]).tobytes()).hexdigest()[:16]
    return {"kind": "rec", "seed": self.seed, "fingerprint": h,
            "rows_per_epoch": [len(self.users)], "step": int(step),
            "widths": list(self.widths), "sort_window": int(self.sort_window)}

  def restore(self, state: dict, step: int) -> None:
    check_state(self.state(step), state)


def build_rec_data(cfg, process_index: int = 0, process_count: int = 1) -> RecData:
  """data.catalogue (the items), data.train (interactions) and data.dev (held-out next items)."""
  d = cfg.data
  for field in ("catalogue", "train"):
    if not d.get(field, ""):
      raise ConfigError(f"task 'rec' needs config 'data.{field}' (data.catalogue: item<TAB>"
                        "title<TAB>genres; data.train: user<TAB>item<TAB>timestamp)")
  catalogue = read_catalogue(d.catalogue)
  index = catalogue.index()
  histories = read_histories([d.train], index, "data.train")
  counts = counts_from(histories, catalogue.vocab_size)
  catalogue = dataclasses.replace(catalogue, counts=tuple(int(c) for c in counts[1:]))
  users = [u for u, items in histories.items() if len(items) >= 2]  # a row needs a next item
  if not users:
    raise DataError(f"data.train={d.train!r}: no user has two interactions to learn from")
  dev = read_targets(d.dev, index, "data.dev") if d.dev else {}
  return RecData(catalogue, users, [histories[u] for u in users],
                 [dev.get(u, PAD) for u in users], d.seq_len, cfg.train.batch_size, cfg.seed,
                 process_index, process_count, tuple(bucket_widths(d.buckets, d.seq_len)),
                 d.sort_window)
