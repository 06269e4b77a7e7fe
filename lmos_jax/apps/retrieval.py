"""Answer retrieval: a knowledge base of (question, answer) pairs, embedded once by the
finetuned encoder, searched by exact top-k cosine similarity on the device.

The encoder's sentence embeddings (`Classifier.forward_packed`) are L2-normalised, so cosine
similarity is a plain dot product: a query batch (Q, D) against the index (N, D) is one matmul
and `lax.top_k`. Exact search costs O(N * D) per query; at D=384 that is ~0.4 GFLOP per query
at a million entries, still milliseconds on an accelerator. Past ~1M entries (or when the
index no longer fits device memory) an approximate index such as faiss (IVF/HNSW) would take
over `top_k_cosine`'s role; nothing else here would change.

The index lives in the workdir, `WORKDIR/retrieval/`: `embeddings.npy` (N, D) float32,
`entries.jsonl` (the questions and answers, row for row) and `meta.json`, which records the
sha256 of the knowledge-base file and of the model's params it was built from. `load_or_build`
rebuilds it when either changes, so an edited knowledge base is picked up at the next start.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmos_jax.errors import UserError

INDEX_DIR = "retrieval"


@dataclasses.dataclass(frozen=True)
class KBEntry:
  question: str
  answer: str


@dataclasses.dataclass(frozen=True)
class Match:
  text: str
  answer: str
  score: float


def read_kb(path: str | Path) -> list[KBEntry]:
  """Knowledge base entries from a JSONL file (objects with "question" and "answer") or a
  TSV/CSV file with a header row naming `question` and `answer` columns. Every problem is a
  UserError naming the file and line."""
  p = Path(path)
  if not p.is_file():
    raise UserError(f"--kb {path}: no such file; give a .jsonl or .tsv file of question and "
                    "answer pairs")
  try:
    text = p.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"--kb {path}: not valid UTF-8 (byte {e.start}); re-encode it") from None
  entries = (_kb_jsonl(text, path) if p.suffix.lower() == ".jsonl"
             else _kb_table(text, path, "," if p.suffix.lower() == ".csv" else "\t"))
  if not entries:
    raise UserError(f"--kb {path}: no entries; give at least one question and answer")
  return entries


def _kb_jsonl(text: str, path: str | Path) -> list[KBEntry]:
  out = []
  for n, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"--kb {path} line {n}: not JSON ({e.msg})") from None
    out.append(_entry(obj, f"--kb {path} line {n}"))
  return out


def _kb_table(text: str, path: str | Path, delimiter: str) -> list[KBEntry]:
  import csv
  import io
  reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
  header = [h.strip().lower() for h in next(reader, [])]
  if "question" not in header or "answer" not in header:
    raise UserError(f"--kb {path}: the header {header} must name a 'question' and an 'answer' "
                    "column")
  iq, ia = header.index("question"), header.index("answer")
  out = []
  for n, row in enumerate(reader, start=2):
    if not row or all(not c.strip() for c in row):
      continue
    if len(row) <= max(iq, ia):
      raise UserError(f"--kb {path} line {n}: {len(row)} columns, the header has "
                      f"{len(header)}")
    out.append(_entry({"question": row[iq], "answer": row[ia]}, f"--kb {path} line {n}"))
  return out


def _entry(obj: object, where: str) -> KBEntry:
  if not isinstance(obj, dict):
    raise UserError(f"{where}: expected an object with \"question\" and \"answer\"")
  q, a = obj.get("question"), obj.get("answer")
  if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
    raise UserError(f"{where}: \"question\" and \"answer\" must be non-empty strings")
  return KBEntry(q.strip(), a.strip())


def top_k_cosine(index_ND: jax.Array, query_QD: jax.Array, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(scores (Q, k), row indices (Q, k)) of the k index rows with the largest dot product
  with each query, best first: cosine similarity for L2-normalised rows. Exact; k is capped
  at N."""
  k = min(int(k), int(index_ND.shape[0]))
  scores_QK, idx_QK = _top_k_dot(index_ND, query_QD, k)
  return np.asarray(scores_QK), np.asarray(idx_QK)


@functools.partial(jax.jit, static_argnames="k")
def _top_k_dot(index_ND: jax.Array, query_QD: jax.Array, k: int
               ) -> tuple[jax.Array, jax.Array]:
  sim_QN = jnp.matmul(query_QD.astype(jnp.float32), index_ND.astype(jnp.float32).T,
                      precision=jax.lax.Precision.HIGHEST)
  return jax.lax.top_k(sim_QN, k)


@dataclasses.dataclass
class RetrievalIndex:
  """Knowledge-base embeddings on the device (N, D) with their entries, row for row."""

  emb_ND: jax.Array
  entries: list[KBEntry]

  def search(self, query_QD: np.ndarray, k: int) -> list[list[Match]]:
    """The k best entries for each query embedding, best first."""
    scores_QK, idx_QK = top_k_cosine(self.emb_ND, jnp.asarray(query_QD), k)
    return [[Match(self.entries[i].question, self.entries[i].answer, float(s))
             for s, i in zip(srow, irow)] for srow, irow in zip(scores_QK, idx_QK)]


def file_sha256(path: str | Path) -> str:
  return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_or_build(workdir: str | Path, kb_path: str | Path, model_stamp: str,
                  embed: Callable[[Sequence[str]], np.ndarray]) -> tuple[RetrievalIndex, bool]:
  """(index, rebuilt): the index saved in `workdir/retrieval/` when its meta matches the
  knowledge base's sha256 and `model_stamp`, else one built by `embed` (questions -> (N, D)
  L2-normalised embeddings) and saved there, replacing the stale one."""
  entries = read_kb(kb_path)
  folder = Path(workdir) / INDEX_DIR
  meta = {"kb": str(kb_path), "kb_sha256": file_sha256(kb_path), "model": model_stamp,
          "entries": len(entries)}
  saved = _read_saved(folder, meta)
  if saved is not None:
    return RetrievalIndex(jnp.asarray(saved), entries), False
  emb_ND = np.asarray(embed([e.question for e in entries]), np.float32)
  folder.mkdir(exist_ok=True)
  np.save(folder / "embeddings.npy", emb_ND)
  with (folder / "entries.jsonl").open("w", encoding="utf-8") as f:
    for e in entries:
      f.write(json.dumps(dataclasses.asdict(e), ensure_ascii=False) + "\n")
  (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
  return RetrievalIndex(jnp.asarray(emb_ND), entries), True


def _read_saved(folder: Path, meta: dict) -> np.ndarray | None:
  """The saved embeddings when meta.json matches `meta` (same kb bytes, same model)."""
  try:
    old = json.loads((folder / "meta.json").read_text())
    if {k: old.get(k) for k in ("kb_sha256", "model", "entries")} != {
        k: meta[k] for k in ("kb_sha256", "model", "entries")}:
      return None
    emb = np.load(folder / "embeddings.npy")
  except (OSError, ValueError):
    return None
  return emb if emb.shape[0] == meta["entries"] else None
