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

from lmos_jax.data.errors import DataError


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
  """Characters of the training text, sorted.

  Text with other characters cannot be encoded: `encode` raises a DataError naming them
  (mapping them to some id would silently train or prompt on the wrong characters).
  """

  chars: str

  @classmethod
  def fit(cls, text: str) -> "CharTokenizer":
    return cls("".join(sorted(set(text))))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def unknown_chars(self, text: str) -> list[str]:
    """The characters of `text` outside the vocabulary, sorted (empty: encodable)."""
    return sorted(set(text) - set(self.chars))

  def unknown_message(self, unknown: list[str]) -> str:
    shown = ", ".join(repr(c) for c in unknown[:12]) + (" ..." if len(unknown) > 12 else "")
    return (f"{len(unknown)} character(s) outside the char vocabulary (the "
            f"{len(self.chars)} characters of the training text): {shown}; use text with "
            "only those characters, or data.tokenizer=byte, which encodes any text")

  def encode(self, text: str) -> np.ndarray:
    unknown = self.unknown_chars(text)
    if unknown:
      raise DataError(self.unknown_message(unknown))
    # code points through a lookup table: a Python loop per character took ~0.05 s of every
    # start-up for tinyshakespeare's 1.1M characters, this takes a few milliseconds
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    mine = np.array([ord(c) for c in self.chars], dtype=np.uint32)
    table = np.zeros(int(mine.max(initial=0)) + 1, dtype=np.int32)
    table[mine] = np.arange(len(mine), dtype=np.int32)
    return table[points]

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


def check_long_enough(ids: np.ndarray, seq_len: int, field: str) -> None:
  """Random windows need more than seq_len+1 tokens; checked when the data is built, so a
  short corpus fails before anything compiles rather than in the first batch."""
  if len(ids) <= seq_len + 1:
    raise DataError(f"config '{field}': {len(ids)} training tokens is not longer than "
                    f"data.seq_len+1={seq_len + 1}; give more text or shorten data.seq_len")


def window_batch(ids: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int
                 ) -> dict[str, np.ndarray]:
  """Random windows at step `step`: a pure function of (seed, step), so resume is exact."""
  check_long_enough(ids, seq_len, "data")
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(ids) - seq_len - 1, size=batch_size)
  idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
  chunk = ids[idx]
  return {"inputs": chunk[:, :-1].astype(np.int32), "targets": chunk[:, 1:].astype(np.int32)}
