"""Rows of tokens for the models: decoder rows from token documents (EOS-joined fixed
windows, or first-fit packing) and encoder rows packed from encoded texts. Packed rows carry
segment ids and per-segment positions so attention never crosses a document.

A decoder row holds `seq_len` (input, target) pairs. Rows are numpy arrays of shape
(N, seq_len): inputs, targets, weights (0 on padding), and for packing segment_ids (1.. per
row, 0 on padding) and positions (restarting at 0 in each segment).

Encoder rows (`pack_texts`) put several short texts (each [CLS] ... [SEP] as encoded) side by
side in one row: a batch of 32 questions of ~16 tokens fills 8 rows of 64 instead of 32 rows
padded to the longest question. Each text keeps its own positions (0..), token types and
segment, so its outputs equal the padded ones; the pooled outputs are read back per text
through `cls_index` (its first token) and `text_index` (which text each token is).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Sequence

import numpy as np


def join_with_eos(docs: list[np.ndarray], eos: int) -> np.ndarray:
  """Documents followed by EOS each, concatenated (the GPT-2 convention)."""
  if not docs:
    return np.zeros((0,), np.int32)
  parts = []
  for d in docs:
    parts += [d, np.asarray([eos], np.int32)]
  return np.concatenate(parts).astype(np.int32)


def fixed_windows(stream: np.ndarray, seq_len: int, pad: int) -> dict[str, np.ndarray]:
  """Consecutive windows of seq_len pairs; the last partial one padded with weight 0.

  Window i covers stream[i*seq_len : i*seq_len + seq_len + 1], so every token except the
  first is a target exactly once.
  """
  n_pairs = len(stream) - 1
  if n_pairs < 1:
    raise ValueError("the token stream is shorter than 2 tokens; give more text")
  n_rows = -(-n_pairs // seq_len)
  padded = np.full((n_rows * seq_len + 1,), pad, np.int32)
  padded[:len(stream)] = stream
  idx = np.arange(n_rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  chunk = padded[idx]
  weights = (idx[:, 1:] <= n_pairs).astype(np.float32)
  return {"inputs": chunk[:, :-1], "targets": chunk[:, 1:], "weights": weights}


def split_long(doc: np.ndarray, seq_len: int) -> list[np.ndarray]:
  """Pieces of at most seq_len+1 tokens overlapping by one, so no target is lost."""
  if len(doc) <= seq_len + 1:
    return [doc]
  return [doc[s:s + seq_len + 1] for s in range(0, len(doc) - 1, seq_len)]


def first_fit_rows(docs: Iterable[np.ndarray], seq_len: int, open_bins: int = 64
                   ) -> Iterator[list[np.ndarray]]:
  """First-fit packing of documents (each already ending in EOS, <= seq_len+1 tokens), as
  rows of documents in the order they close: a stream can be packed as it arrives.

  A document of n tokens takes n-1 slots (inputs d[:-1], targets d[1:]). It goes into the
  first open row with room; when none has room the oldest open row is closed. At most
  `open_bins` rows are open, which bounds the work per document and keeps row order close
  to document order.
  """
  rows: list[list[np.ndarray]] = []
  free: list[int] = []
  for d in docs:
    n = len(d) - 1
    if n < 1:
      continue
    if n > seq_len:
      raise ValueError(f"document of {len(d)} tokens is longer than the window; split it "
                       "with split_long first")
    for i, f in enumerate(free):
      if f >= n:
        rows[i].append(d)
        free[i] -= n
        break
    else:
      if len(rows) >= open_bins:
        free.pop(0)
        yield rows.pop(0)
      rows.append([d])
      free.append(seq_len - n)
  yield from rows


def first_fit_pack(docs: list[np.ndarray], seq_len: int, pad: int, open_bins: int = 64
                   ) -> dict[str, np.ndarray]:
  """`first_fit_rows` of a whole list, as arrays."""
  return rows_to_arrays(list(first_fit_rows(docs, seq_len, open_bins)), seq_len, pad)


def rows_to_arrays(rows: list[list[np.ndarray]], seq_len: int, pad: int
                   ) -> dict[str, np.ndarray]:
  n = len(rows)
  out = {"inputs": np.full((n, seq_len), pad, np.int32),
         "targets": np.full((n, seq_len), pad, np.int32),
         "weights": np.zeros((n, seq_len), np.float32),
         "segment_ids": np.zeros((n, seq_len), np.int32),
         "positions": np.zeros((n, seq_len), np.int32)}
  for r, docs in enumerate(rows):
    at = 0
    for s, d in enumerate(docs, start=1):
      k = len(d) - 1
      out["inputs"][r, at:at + k] = d[:-1]
      out["targets"][r, at:at + k] = d[1:]
      out["weights"][r, at:at + k] = 1.0
      out["segment_ids"][r, at:at + k] = s
      out["positions"][r, at:at + k] = np.arange(k)
      at += k
  return out


def first_fit_decreasing(lengths_N: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
  """(row, offset) of each text packed into rows of `width` tokens: longest first, each into
  the first row with room (FFD, within 11/9 of the fewest rows). Lengths must be <= width."""
  row_N = np.zeros(len(lengths_N), np.int32)
  offset_N = np.zeros(len(lengths_N), np.int32)
  used: list[int] = []
  for i in np.argsort(-np.asarray(lengths_N), kind="stable"):
    n = int(lengths_N[i])
    if n > width:
      raise ValueError(f"a text of {n} tokens does not fit a row of {width}")
    r = next((r for r, u in enumerate(used) if u + n <= width), len(used))
    if r == len(used):
      used.append(0)
    row_N[i], offset_N[i] = r, used[r]
    used[r] += n
  return row_N, offset_N


@dataclasses.dataclass(frozen=True)
class PackShape:
  """A compiled shape texts are packed into: `rows` x `width` tokens."""

  rows: int
  width: int


def pack_shapes(widths: Sequence[int], max_rows: int) -> list[PackShape]:
  """The shapes batches of up to `max_rows` rows are packed into (`widths` ascending):
  - one row at every width: a few short texts stay narrow;
  - 2..7, 8, 10, 12, 14, 16, 20, ... rows (steps of at most 25%) up to max_rows at the
    widest: a mixed batch (a server's) packs tightly, and long rows run faster per token on
    CPU;
  - max_rows rows at every width: batches of long texts (one per row), where rows of the
    widest would be partly empty.
  Few shapes, each compiled once: 24 for 5 widths and 32 rows."""
  counts, c = [], 2
  while c < max_rows:
    counts.append(c)
    c += 1 << max(0, c.bit_length() - 3)  # 1 up to 7, 2 up to 15, 4 up to 31, ...
  counts += [max_rows] if max_rows > 1 else []
  wide = widths[-1]
  return ([PackShape(1, w) for w in widths] + [PackShape(c, wide) for c in counts]
          + [PackShape(max_rows, w) for w in widths[:-1] if max_rows > 1])


@dataclasses.dataclass(frozen=True)
class PackPlan:
  """One packed batch: which texts (indices into the input), its shape, and each text's row
  (within the batch) and offset."""

  texts: np.ndarray
  shape: PackShape
  row: np.ndarray
  offset: np.ndarray


def plan_batches(lengths_N: np.ndarray, widths: Sequence[int], max_rows: int,
                 max_texts: int) -> list[PackPlan]:
  """Texts packed first-fit-decreasing into rows of the widest width (as full as the mix of
  lengths allows), then consecutive rows cut into batches of at most `max_rows` rows and
  `max_texts` texts; each batch takes the shape of `pack_shapes(widths, max_rows)` with the
  fewest tokens (ties to the wider) that holds its rows and its fullest row."""
  row_N, offset_N = first_fit_decreasing(lengths_N, widths[-1])
  n_rows = int(row_N.max()) + 1 if len(row_N) else 0
  used_R = np.bincount(row_N, weights=lengths_N, minlength=n_rows)
  count_R = np.bincount(row_N, minlength=n_rows)
  shapes = sorted(pack_shapes(widths, max_rows), key=lambda s: (s.rows * s.width, -s.width))
  plans, lo = [], 0
  while lo < n_rows:
    hi, texts = lo, 0
    while hi < n_rows and hi - lo < max_rows and texts + count_R[hi] <= max_texts:
      texts += count_R[hi]
      hi += 1
    if hi == lo:
      raise ValueError(f"a row of {count_R[lo]} texts exceeds max_texts={max_texts}")
    need = used_R[lo:hi].max()
    shape = next(s for s in shapes if s.rows >= hi - lo and s.width >= need)
    ids = np.nonzero((row_N >= lo) & (row_N < hi))[0]
    plans.append(PackPlan(ids, shape, row_N[ids] - lo, offset_N[ids]))
    lo = hi
  return plans


def pack_texts(rows: dict[str, np.ndarray], lengths_N: np.ndarray, shape: PackShape,
               row_N: np.ndarray, offset_N: np.ndarray, num_texts: int
               ) -> dict[str, np.ndarray]:
  """Encoded texts (`inputs`, `token_type_ids` of shape (N, >= length)) placed at (row,
  offset) in a (shape.rows, shape.width) batch with `position_ids` restarting at each text,
  `segment_ids` (text i is i + 1; 0 on padding), `text_index` (the text of each token,
  `num_texts` on padding) and `cls_index` (num_texts,): the flat position of each text's first
  token (0 for the unused slots beyond N, whose outputs are dropped)."""
  n = len(lengths_N)
  if n > num_texts:
    raise ValueError(f"{n} texts for {num_texts} text slots")
  r, w = shape.rows, shape.width
  out = {"inputs": np.zeros((r, w), np.int32), "token_type_ids": np.zeros((r, w), np.int32),
         "position_ids": np.zeros((r, w), np.int32), "segment_ids": np.zeros((r, w), np.int32),
         "text_index": np.full((r, w), num_texts, np.int32),
         "cls_index": np.zeros((num_texts,), np.int32)}
  for i in range(n):
    k, row, at = int(lengths_N[i]), int(row_N[i]), int(offset_N[i])
    cols = slice(at, at + k)
    out["inputs"][row, cols] = rows["inputs"][i, :k]
    out["token_type_ids"][row, cols] = rows["token_type_ids"][i, :k]
    out["position_ids"][row, cols] = np.arange(k)
    out["segment_ids"][row, cols] = i + 1
    out["text_index"][row, cols] = i
    out["cls_index"][i] = row * w + at
  return out
