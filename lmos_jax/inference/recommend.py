"""`lmos recommend`: rank items for users from a trained recommender workdir (task rec).

    lmos recommend --workdir W --history A.tsv [B.tsv ...] --candidates C.tsv --output O.tsv
    lmos recommend --workdir W --history A.tsv --output O.tsv --k 10

Histories are `user<TAB>item[<TAB>timestamp]` (later files append to earlier ones); C.tsv is
`user<TAB>space-separated item ids`; O.tsv gets `user<TAB>items best first`: every candidate
(so any cut-off can be scored), or without --candidates the top k of the items the user has
not interacted with. A user with no history gets the popularity order of the training data
(counted on stderr). The leave-one-out metrics (HR@k, NDCG@k) live here too, so the
benchmark and the tests score rankings with the same code.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmos_jax.data.interactions import (Catalogue, history_window, read_candidates,
                                        read_histories)
from lmos_jax.errors import UserError
from lmos_jax.workdir import latest_params, model_layout, read_config, read_items


@dataclasses.dataclass
class Recommender:
  """A trained recommender: its catalogue and `scores(histories) -> (U, N)` next-item
  scores (row 0, padding, at -inf)."""

  catalogue: Catalogue
  seq_len: int
  scores: Callable[[Sequence[Sequence[int]]], np.ndarray]


def load_recommender(workdir: str | Path, batch: int = 128) -> Recommender:
  """The workdir's config, catalogue and latest params, and one compiled scorer for
  (batch, seq_len) histories."""
  cfg = read_config(workdir)
  if cfg.task != "rec":
    raise UserError(f"--workdir {workdir} trained task {cfg.task!r}; `lmos recommend` needs a "
                    "recommender (config task='rec', e.g. configs/movielens.py)")
  catalogue = read_items(workdir)
  graphdef, abstract = model_layout(cfg, catalogue.vocab_size)
  params = jax.tree.map(jnp.asarray, latest_params(workdir))
  seq_len = cfg.data.seq_len

  @jax.jit
  def last_scores(p, ids_UT, lengths_U):
    return nnx.merge(graphdef, p).last_scores(ids_UT, lengths_U)

  def scores(histories: Sequence[Sequence[int]]) -> np.ndarray:
    out = []
    for lo in range(0, len(histories), batch):
      part = list(histories[lo:lo + batch])
      n = len(part)
      part += [part[0]] * (batch - n)
      ids = np.stack([history_window(h, seq_len) for h in part])
      lengths = np.array([min(len(h), seq_len) for h in part], np.int32)
      out.append(np.asarray(last_scores(params, ids, lengths))[:n])
    return np.concatenate(out) if out else np.zeros((0, catalogue.vocab_size), np.float32)
  return Recommender(catalogue, seq_len, scores)


def rank_of(scores_N: np.ndarray, target: int, candidates: Sequence[int]) -> int:
  """0-based rank of `target` among `candidates` by score: the other candidates scoring at
  least as high (ties count against it, so a constant scorer earns nothing). The target
  itself is never counted, listed among the candidates or not (a re-watched item is in
  the history that full ranking excludes)."""
  others = np.asarray([c for c in candidates if c != target], np.int64)
  return int((scores_N[others] >= scores_N[target]).sum())


def hit_ndcg(ranks: np.ndarray, k: int) -> tuple[float, float]:
  """HR@k and NDCG@k of 0-based ranks of one relevant item each: a hit scores 1/log2(rank+2)."""
  ranks = np.asarray(ranks)
  hit = ranks < k
  return float(hit.mean()), float((hit / np.log2(ranks + 2)).mean())


def unseen(vocab_size: int, history: Sequence[int]) -> np.ndarray:
  """Every item row the user has not interacted with (padding row 0 excluded)."""
  keep = np.ones(vocab_size, bool)
  keep[0] = False
  keep[np.asarray(history, np.int64)] = False
  return np.flatnonzero(keep)


def ranked(scores_N: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """`rows` best first (ties keep their given order)."""
  return rows[np.argsort(-scores_N[rows], kind="stable")]


def leave_one_out(scores_UN: np.ndarray, histories: Sequence[Sequence[int]],
                  targets: Sequence[int], negatives: Sequence[Sequence[int]], k: int = 10
                  ) -> dict[str, np.ndarray]:
  """Per-user ranks of the held-out item: among target + sampled negatives, and among all
  items outside the user's history ('full')."""
  sampled, full = [], []
  for s, h, t, neg in zip(scores_UN, histories, targets, negatives):
    sampled.append(rank_of(s, t, [t, *neg]))
    full.append(rank_of(s, t, unseen(len(s), h)))
  return {"sampled": np.asarray(sampled), "full": np.asarray(full)}


def popularity_scores(catalogue: Catalogue, users: int) -> np.ndarray:
  """(users, N) scores from training counts: the popularity floor and the fallback."""
  s = np.asarray([-np.inf, *catalogue.counts], np.float64)
  return np.broadcast_to(s, (users, len(s)))


def recommend_file(rec: Recommender, history_paths: Sequence[str], candidates_path: str | None,
                   out_path: str, k: int) -> dict[str, int]:
  """Writes O.tsv; returns counts of users written and of users given popularity."""
  index = rec.catalogue.index()
  histories = read_histories(history_paths, index, "--history")
  if candidates_path:
    wanted = read_candidates(candidates_path, index)
  else:
    wanted = {u: None for u in histories}
  users = list(wanted)
  known = [u for u in users if histories.get(u)]
  scores = dict(zip(known, rec.scores([histories[u] for u in known])))
  popular = popularity_scores(rec.catalogue, 1)[0]
  ids = np.asarray(("",) + rec.catalogue.ids, dtype=object)
  with open(out_path, "w", encoding="utf-8") as f:
    for u in users:
      s = scores.get(u, popular)
      cands = wanted[u]
      rows = (ranked(s, np.asarray(cands)) if cands is not None
              else ranked(s, unseen(len(s), histories.get(u, [])))[:k])
      f.write(f"{u}\t{' '.join(ids[rows])}\n")
  return {"users": len(users), "popularity": len(users) - len(known)}


def main(argv: list[str]) -> int:
  from lmos_jax.errors import ArgumentParser, existing_dir, number
  ap = ArgumentParser(prog=argv[0], description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, type=existing_dir("config.json"),
                  help="a run directory of task rec")
  ap.add_argument("--history", nargs="+", required=True,
                  help="user<TAB>item[<TAB>timestamp] files; later files append")
  ap.add_argument("--candidates", default=None,
                  help="user<TAB>space-separated item ids; each is ranked in full")
  ap.add_argument("--output", required=True, help="user<TAB>items best first")
  ap.add_argument("--force", action="store_true", help="overwrite an existing --output")
  ap.add_argument("--k", type=number(int, 1), default=10,
                  help="without --candidates: items per user (default 10)")
  args = ap.parse_args(argv[1:])
  if Path(args.output).exists() and not args.force:
    raise UserError(f"--output {args.output} exists; choose a new file or add --force to "
                    "overwrite it")
  rec = load_recommender(args.workdir)
  n = recommend_file(rec, args.history, args.candidates, args.output, args.k)
  if n["popularity"]:
    print(f"lmos recommend: {n['popularity']} of {n['users']} users have no history; ranked "
          "by popularity in the training data", file=sys.stderr)
  print(f"lmos recommend: wrote {n['users']} rankings to {args.output}", file=sys.stderr)
  return 0
