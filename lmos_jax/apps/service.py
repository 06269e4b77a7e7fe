"""Customer-service answers from a finetuned intent classifier: a template answer per intent,
retrieval from a knowledge base when no template fits, and a handoff to a person otherwise.

Policy, for one question with intent probabilities and retrieved matches (best first):
  1. template:  the top intent's probability >= `intent_threshold` and the answer bank has a
                template for that intent;
  2. retrieval: else the best knowledge-base match, when its cosine score >=
                `retrieval_threshold`;
  3. handoff:   else no answer; the question goes to a person.

Both thresholds are chosen on labelled dev data by `choose_threshold`: the lowest threshold
whose accepted answers are right at least `target` of the time (a template is right when the
predicted intent is the gold one; a retrieved answer is right when the matched question's
intent is the gold one). A lower threshold answers more questions automatically; the target
caps the share of wrong automatic answers. `experiments/banking77_thresholds.py` runs this on
BANKING77's dev set and writes `WORKDIR/answer_thresholds.json`, which `lmos serve` reads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from lmos_jax.apps.retrieval import Match
from lmos_jax.errors import UserError

THRESHOLDS_FILE = "answer_thresholds.json"


def read_answers(path: str | Path, labels: Sequence[str]) -> dict[str, str]:
  """The answer bank: JSONL objects {"intent": ..., "answer": ...}, one template per intent,
  every intent one of the classifier's `labels`."""
  p = Path(path)
  if not p.is_file():
    raise UserError(f"--answers {path}: no such file; give a JSONL file of "
                    "{\"intent\", \"answer\"} objects")
  known = set(labels)
  out: dict[str, str] = {}
  for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
    if not line.strip():
      continue
    where = f"--answers {path} line {n}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) and obj[k].strip()
                                            for k in ("intent", "answer")):
      raise UserError(f"{where}: expected {{\"intent\": str, \"answer\": str}}, both non-empty")
    if obj["intent"] not in known:
      raise UserError(f"{where}: intent {obj['intent']!r} is not a label of the model "
                      f"({len(labels)} labels, e.g. {', '.join(list(labels)[:3])})")
    if obj["intent"] in out:
      raise UserError(f"{where}: a second answer for intent {obj['intent']!r}; keep one")
    out[obj["intent"]] = obj["answer"].strip()
  return out


@dataclasses.dataclass(frozen=True)
class AnswerPolicy:
  templates: dict[str, str]
  intent_threshold: float
  retrieval_threshold: float

  def decide(self, intent: str, confidence: float, matches: Sequence[Match]) -> dict:
    """The /v1/answer record for one question (see the module docstring for the order)."""
    rec = {"intent": intent, "confidence": confidence,
           "matches": [dataclasses.asdict(m) for m in matches]}
    if confidence >= self.intent_threshold and intent in self.templates:
      return {**rec, "answer": self.templates[intent], "source": "template"}
    if matches and matches[0].score >= self.retrieval_threshold:
      return {**rec, "answer": matches[0].answer, "source": "retrieval"}
    return {**rec, "answer": None, "source": "handoff"}


def choose_threshold(scores: np.ndarray, correct: np.ndarray, target: float) -> float:
  """The lowest score threshold t such that, among items with score >= t, the share that is
  correct is >= `target` (precision at t). Candidates are the observed scores; when no
  threshold reaches the target, one above every score (nothing accepted)."""
  scores, correct = np.asarray(scores, np.float64), np.asarray(correct, bool)
  if scores.shape != correct.shape:
    raise ValueError(f"scores {scores.shape} and correct {correct.shape} differ in shape")
  order = np.argsort(-scores, kind="stable")
  s, c = scores[order], correct[order]
  precision = np.cumsum(c) / np.arange(1, len(c) + 1)
  # accepting scores >= s[i] accepts every item with an equal score: the last of each tie
  last_of_tie = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)
  ok = np.flatnonzero(last_of_tie & (precision >= target))
  if len(ok) == 0:
    return float(np.nextafter(s[0], np.inf)) if len(s) else 1.0
  return float(s[ok[-1]])


def read_thresholds(workdir: str | Path) -> dict | None:
  """WORKDIR/answer_thresholds.json ({"intent_threshold", "retrieval_threshold", ...}) when
  present."""
  p = Path(workdir) / THRESHOLDS_FILE
  if not p.is_file():
    return None
  try:
    obj = json.loads(p.read_text())
    return {k: float(obj[k]) for k in ("intent_threshold", "retrieval_threshold")}
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f"{p}: unreadable ({e}); rerun experiments/banking77_thresholds.py with "
                    "--force or delete it") from None
