"""Windows of classified records and the negative-share surge statistic of `lmos monitor`.

Pure pieces, no model: record times parsed to unix seconds, time cut into fixed windows
(`window_start`), per (window, topic) tallies (`WindowStats`), and the surge test
(`surge_z`, `check_surge`) of one closed window against the trailing baseline of the
same topic.

The surge statistic is a one-sided z-score of the window's negative share p = k / n
against the baseline's pooled proportion p0 = (K + 1/2) / (N + 1) over the previous B
windows of that topic (K negatives among N records; the half-count keeps p0 off 0 and 1, so
a baseline with no negatives still gives a finite standard error), with the binomial
standard error of a share of n records at p0:

    z = (p - p0) / sqrt(p0 (1 - p0) / n)

A window alerts when n >= min_count, N >= min_count, z >= threshold and p - p0 >= min_rise.
The minimum counts keep a handful of records from alerting on noise; the minimum absolute
rise keeps a large, steady topic from alerting on a statistically significant but small
change.
"""

from __future__ import annotations

import dataclasses
import math
import re
from datetime import datetime, timezone
from typing import Any, Sequence

UNITS_S = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
NEGATIVE, NEUTRAL, POSITIVE = "negative", "neutral", "positive"
MAX_EXAMPLES = 5  # ids (or texts) of the most negative records kept per window and topic


def parse_window(spec: str) -> float:
  """Seconds of a window spec: '1h', '30m', '15min', '90s', '1d', or a bare number of
  seconds."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", spec.lower())
  if not m or (m.group(2) and m.group(2) not in UNITS_S):
    raise ValueError(f"{spec!r}: expected a duration such as 1h, 30m, 90s or 1d")
  seconds = float(m.group(1)) * UNITS_S.get(m.group(2) or "s", 1)
  if seconds <= 0:
    raise ValueError(f"{spec!r}: the window must be longer than 0 s")
  return seconds


def parse_time(value: Any) -> float:
  """Unix seconds of a record's time: a number (unix seconds) or an ISO-8601 string
  ('2024-05-01T13:45:00Z', with or without an offset; without one it is read as UTC, so a
  stream means the same on every machine)."""
  if isinstance(value, bool):
    raise ValueError("time is a boolean, expected ISO-8601 or unix seconds")
  if isinstance(value, (int, float)):
    t = float(value)
  elif isinstance(value, str):
    s = value.strip()
    try:
      t = float(s)
    except ValueError:
      try:
        dt = datetime.fromisoformat(s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s)
      except ValueError:
        raise ValueError(f"time {value!r} is neither ISO-8601 nor unix seconds") from None
      t = (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
  else:
    raise ValueError(f"time is a {type(value).__name__}, expected ISO-8601 or unix seconds")
  if not math.isfinite(t):
    raise ValueError(f"time {value!r} is not finite")
  return t


def iso(t: float) -> str:
  """A unix time as ISO-8601 UTC with a Z, as the outputs write window starts."""
  return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def window_start(t: float, width_s: float) -> float:
  """Start of the window holding time t: windows are [k*width, (k+1)*width) from the unix
  epoch, so every run (and every restart) cuts a stream at the same boundaries."""
  return math.floor(t / width_s) * width_s


def sentiment_score(probs: dict[str, float]) -> float:
  """P(positive) - P(negative), in [-1, 1]: one number per record whose mean over a window
  moves with the balance of opinion (neutral records pull it toward 0)."""
  return float(probs.get(POSITIVE, 0.0)) - float(probs.get(NEGATIVE, 0.0))


@dataclasses.dataclass
class WindowStats:
  """Tallies of one topic in one window: record count, per-label counts, the sum of
  sentiment scores, and the most negative records' ids (by P(negative), highest first)."""

  count: int = 0
  labels: dict[str, int] = dataclasses.field(default_factory=dict)
  score_sum: float = 0.0
  examples: list[tuple[float, str]] = dataclasses.field(default_factory=list)

  def add(self, label: str, score: float, p_negative: float, example: str) -> None:
    self.count += 1
    self.labels[label] = self.labels.get(label, 0) + 1
    self.score_sum += score
    if label == NEGATIVE:
      self.examples.append((p_negative, example))
      self.examples.sort(key=lambda e: -e[0])
      del self.examples[MAX_EXAMPLES:]

  def share(self, label: str) -> float:
    return self.labels.get(label, 0) / self.count if self.count else 0.0

  @property
  def mean_score(self) -> float:
    return self.score_sum / self.count if self.count else 0.0


@dataclasses.dataclass(frozen=True)
class SurgeRule:
  """When a window's negative share is a surge (see the module docstring)."""

  baseline: int = 24  # trailing windows pooled into the baseline proportion
  min_count: int = 10  # records in the window, and in the baseline, for a test at all
  threshold: float = 4.0  # z-score at or above which a window alerts
  min_rise: float = 0.2  # absolute rise of the negative share over the baseline


def pooled_baseline(k_negative: int, n: int) -> float:
  """Baseline proportion (K + 1/2) / (N + 1): the pooled negative share, kept off 0 and 1."""
  return (k_negative + 0.5) / (n + 1.0)


def surge_z(k: int, n: int, p0: float, big_n: int) -> float:
  """One-sided z of k negatives among n records against a baseline share p0 estimated from
  big_n records: (k/n - p0) / sqrt(p0 (1 - p0) (1/n + 1/big_n))."""
  if n <= 0 or big_n <= 0:
    return 0.0
  return (k / n - p0) / math.sqrt(p0 * (1.0 - p0) * (1.0 / n + 1.0 / big_n))


@dataclasses.dataclass(frozen=True)
class SurgeTest:
  """The surge test of one window: its share, the baseline's, the z-score and whether it
  alerts (False also when too few records for a test; `tested` says which)."""

  negative_share: float
  baseline: float
  baseline_count: int
  score: float
  tested: bool
  alert: bool


def check_surge(window: WindowStats, history: Sequence[WindowStats | None],
                rule: SurgeRule) -> SurgeTest:
  """The window against the pooled `history` (the previous windows of the topic, None for a
  window without records; only the last `rule.baseline` count)."""
  past = [w for w in list(history)[-rule.baseline:] if w is not None]
  big_n = sum(w.count for w in past)
  big_k = sum(w.labels.get(NEGATIVE, 0) for w in past)
  p0 = pooled_baseline(big_k, big_n)
  k, n = window.labels.get(NEGATIVE, 0), window.count
  p = k / n if n else 0.0
  tested = n >= rule.min_count and big_n >= rule.min_count
  z = surge_z(k, n, p0, big_n) if tested else 0.0
  alert = tested and z >= rule.threshold and p - p0 >= rule.min_rise
  return SurgeTest(p, p0, big_n, z, tested, alert)
