"""Plain-text corpora and the simplest tokenizers, for runs that need no download.

The embedded default corpus is the Python installation's own standard library sources
(code and docstrings): present on every machine that can run lmos_jax, read in sorted file
order so the corpus is a deterministic function of the installation.
"""

from __future__ import annotations

import dataclasses
import sysconfig
from pathlib import Path

import numpy as np


def embedded_corpus(max_chars: int) -> str:
  """Concatenated stdlib `.py` sources (sorted paths), capped at `max_chars` characters."""
  root = Path(sysconfig.get_paths()["stdlib"])
  parts, total = [], 0
  for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root).as_posix()
    if rel.startswith(("site-packages/", "test/", "idlelib/idle_test/")) or "/tests/" in rel:
      continue
    try:
      text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
      continue
    parts.append(f"# file: {rel}\n{text}\n")
    total += len(parts[-1])
    if total >= max_chars:
      break
  if not parts:
    raise FileNotFoundError(f"no Python sources found under the stdlib at {root}")
  return "".join(parts)[:max_chars]


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
  """Characters of the training text, sorted; unknown characters map to id 0."""

  chars: str

  @classmethod
  def fit(cls, text: str) -> "CharTokenizer":
    return cls("".join(sorted(set(text))))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    table = {c: i for i, c in enumerate(self.chars)}
    return np.fromiter((table.get(c, 0) for c in text), dtype=np.int32, count=len(text))

  def decode(self, ids) -> str:
    return "".join(self.chars[int(i)] for i in ids if 0 <= int(i) < len(self.chars))


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes: a fixed vocabulary of 256 that fits any text."""

  @property
  def vocab_size(self) -> int:
    return 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def split_train_val(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Head for training, tail for validation (as nanoGPT does), deterministic."""
  n_val = int(len(ids) * val_fraction)
  return ids[: len(ids) - n_val], ids[len(ids) - n_val:]


def window_batch(ids: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int
                 ) -> dict[str, np.ndarray]:
  """Random windows at step `step`: a pure function of (seed, step), so resume is exact."""
  if len(ids) <= seq_len + 1:
    raise ValueError(f"corpus of {len(ids)} tokens is shorter than data.seq_len+1="
                     f"{seq_len + 1}; use a longer text or a shorter data.seq_len")
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(ids) - seq_len - 1, size=batch_size)
  idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
  chunk = ids[idx]
  return {"inputs": chunk[:, :-1].astype(np.int32), "targets": chunk[:, 1:].astype(np.int32)}
