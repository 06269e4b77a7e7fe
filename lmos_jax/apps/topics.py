"""Topic discovery for `lmos monitor` when records carry no `topic`: online k-means over the
classifier's L2-normalised sentence embeddings, with ids that stay the same as it learns.

Every batch is assigned to the nearest centroid (cosine similarity: a dot product of unit
vectors) and moves those centroids by mini-batch k-means (Sculley 2010: each centroid's step
is 1 / the points it has absorbed, so it converges to its points' mean). Once k points have
arrived, Lloyd's k-means (k-means++ seeding) on them gives the first centroids (before that,
each point is a topic); every `refit_every` points it is rerun on a bounded reservoir sample
of everything seen, which repairs what the cheap updates drifted into, and the refitted centroids are matched to the old ones by the Hungarian algorithm
on cosine similarity, so topic `t2` keeps meaning roughly the same thing.

Each topic is named by its most distinctive terms: tf-idf of the words of its texts (document
frequency within the topic times log inverse document frequency over all texts), over the
reservoir's texts at their current assignment.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from typing import Sequence

import numpy as np

# Words that would name every topic (function words, and finance boilerplate shared by
# most PhraseBank sentences), left out of topic names.
STOP_WORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for from
further had has have having he her here hers him his how i if in into is it its itself just
me more most my no nor not now of off on once only or other our out over own same she should
so some such than that the their them then there these they this those through to too under
until up very was we were what when where which while who whom why will with would you your
said says company year mn million eur euro euros percent pct per compared corresponding
period quarter 2005 2006 2007 2008 2009 2010 2011
""".split())
TOKEN_RE = re.compile(r"[a-z][a-z\-]{2,}")


def terms(text: str) -> set[str]:
  """The distinct lower-case words (3+ letters, no stop words) of a text."""
  return {w for w in TOKEN_RE.findall(text.lower()) if w not in STOP_WORDS}


def kmeans_pp(x_ND: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """k-means++ seeding on unit vectors (squared distance 2 - 2 cos): k rows of x."""
  centers = [x_ND[rng.integers(len(x_ND))]]
  for _ in range(1, k):
    d2_N = np.maximum(2.0 - 2.0 * (x_ND @ np.stack(centers).T).max(1), 0.0)
    total = d2_N.sum()
    i = rng.choice(len(x_ND), p=d2_N / total) if total > 0 else rng.integers(len(x_ND))
    centers.append(x_ND[i])
  return np.stack(centers)


def lloyd(x_ND: np.ndarray, c_KD: np.ndarray, iters: int = 20) -> np.ndarray:
  """Spherical k-means (Lloyd's iterations, centroids renormalised): the refined centroids.
  A centroid that loses all its points keeps its place."""
  c_KD = c_KD.copy()
  for _ in range(iters):
    assign_N = (x_ND @ c_KD.T).argmax(1)
    new_KD = c_KD.copy()
    for j in range(len(c_KD)):
      pts = x_ND[assign_N == j]
      if len(pts):
        new_KD[j] = normalise(pts.mean(0))
    if np.allclose(new_KD, c_KD):
      break
    c_KD = new_KD
  return c_KD


def normalise(v: np.ndarray) -> np.ndarray:
  return v / max(float(np.linalg.norm(v)), 1e-12)


def match_centroids(old_KD: np.ndarray, new_KD: np.ndarray) -> np.ndarray:
  """perm with new_KD[perm[j]] the refitted centroid that takes old id j: the assignment of
  maximum total cosine similarity (Hungarian algorithm)."""
  from scipy.optimize import linear_sum_assignment
  rows, cols = linear_sum_assignment(-(old_KD @ new_KD.T))
  perm = np.empty(len(old_KD), np.int64)
  perm[rows] = cols
  return perm


@dataclasses.dataclass
class OnlineKMeans:
  """Mini-batch spherical k-means with stable ids (see the module docstring)."""

  k: int
  refit_every: int = 512
  reservoir_size: int = 4096
  seed: int = 0
  centroids: np.ndarray | None = None  # (k', D), k' < k until k points arrived
  counts: np.ndarray | None = None  # points absorbed per centroid
  seen: int = 0
  reservoir: list[tuple[np.ndarray, str]] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    if self.k < 1:
      raise ValueError(f"k={self.k}: need at least one topic")
    self.rng = np.random.default_rng(self.seed)

  def update(self, emb_ND: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """Topic ids (N,) of a batch of unit embeddings, after learning from it."""
    for i, (e, t) in enumerate(zip(emb_ND, texts)):
      self._sample(self.seen + i, e, t)
    if self.centroids is None or len(self.centroids) < self.k:  # seeding
      if len(self.reservoir) >= self.k:
        self.refit()
      else:  # fewer points than topics so far: each point is a topic
        self.centroids = np.stack([e for e, _ in self.reservoir]).astype(np.float32)
        self.counts = np.ones(len(self.centroids))
    ids = (emb_ND @ self.centroids.T).argmax(1)
    for i, j in enumerate(ids):  # Sculley's per-centre learning rate 1/count
      self.counts[j] += 1
      self.centroids[j] = normalise(self.centroids[j] + (emb_ND[i] - self.centroids[j])
                                    / self.counts[j])
    before = self.seen // self.refit_every
    self.seen += len(emb_ND)
    if self.seen // self.refit_every > before and len(self.reservoir) >= 2 * self.k:
      self.refit()
    return ids

  def _sample(self, index: int, e: np.ndarray, text: str) -> None:
    """Reservoir sampling (Vitter's algorithm R): point number `index` (from 0) kept with
    probability size / (index + 1), so the reservoir is a uniform sample of all points."""
    if len(self.reservoir) < self.reservoir_size:
      self.reservoir.append((e, text))
    else:
      j = int(self.rng.integers(index + 1))
      if j < self.reservoir_size:
        self.reservoir[j] = (e, text)

  def refit(self) -> None:
    """Lloyd's k-means on the reservoir; the result takes the old ids by best match."""
    x_ND = np.stack([e for e, _ in self.reservoir])
    new_KD = lloyd(x_ND, kmeans_pp(x_ND, self.k, self.rng))
    if self.centroids is None:
      self.centroids = np.zeros_like(new_KD)
    if len(self.centroids) < self.k:  # seeding never found k distinct points before
      self.centroids = np.vstack([self.centroids, np.zeros((self.k - len(self.centroids),
                                                            x_ND.shape[1]), np.float32)])
      self.counts = np.append(self.counts, np.zeros(self.k - len(self.counts)))
    perm = match_centroids(self.centroids, new_KD)
    self.centroids = new_KD[perm].astype(np.float32)
    assign_N = (x_ND @ self.centroids.T).argmax(1)
    scale = max(self.seen, len(x_ND)) / len(x_ND)  # counts as if the reservoir were all
    self.counts = np.maximum(np.bincount(assign_N, minlength=self.k) * scale, 1.0)

  def names(self, top: int = 3) -> dict[int, str]:
    """id -> its top distinctive terms (tf-idf over the reservoir's texts), 'a, b, c'."""
    if self.centroids is None or not self.reservoir:
      return {}
    x_ND = np.stack([e for e, _ in self.reservoir])
    assign_N = (x_ND @ self.centroids.T).argmax(1)
    docs = [terms(t) for _, t in self.reservoir]
    return topic_names(docs, assign_N, len(self.centroids), top)


def topic_names(docs: Sequence[set[str]], assign_N: np.ndarray, k: int, top: int = 3
                ) -> dict[int, str]:
  """id -> 'a, b, c': the terms of highest df_topic(t) / n_topic * log(N / df(t)), the share
  of the topic's texts holding t weighted by how rare t is overall (ties: alphabetical)."""
  df = Counter(w for d in docs for w in d)
  n_all = len(docs)
  names = {}
  for j in range(k):
    members = [d for d, a in zip(docs, assign_N) if a == j]
    if not members:
      names[j] = "(empty)"
      continue
    df_j = Counter(w for d in members for w in d)
    score = {w: c / len(members) * math.log(n_all / df[w]) for w, c in df_j.items()}
    best = sorted(score, key=lambda w: (-score[w], w))[:top]
    names[j] = ", ".join(best) if best else "(no terms)"
  return names
