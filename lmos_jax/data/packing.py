"""Decoder rows from token documents: EOS-joined fixed windows, or first-fit packing with
segment ids and per-segment positions so attention never crosses a document.

A row holds `seq_len` (input, target) pairs. Rows are numpy arrays of shape (N, seq_len):
inputs, targets, weights (0 on padding), and for packing segment_ids (1.. per row, 0 on
padding) and positions (restarting at 0 in each segment).
"""

from __future__ import annotations

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


def first_fit_pack(docs: list[np.ndarray], seq_len: int, pad: int, open_bins: int = 64
                   ) -> dict[str, np.ndarray]:
  """First-fit packing of documents (each already ending in EOS, <= seq_len+1 tokens).

  A document of n tokens takes n-1 slots (inputs d[:-1], targets d[1:]). It goes into the
  first open row with room; when none has room the oldest open row is closed. At most
  `open_bins` rows are open, which bounds the work per document and keeps row order close
  to document order.
  """
  rows: list[list[np.ndarray]] = []
  closed: list[list[np.ndarray]] = []
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
        closed.append(rows.pop(0))
        free.pop(0)
      rows.append([d])
      free.append(seq_len - n)
  closed += rows
  return rows_to_arrays(closed, seq_len, pad)


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
