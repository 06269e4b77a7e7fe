"""`lmos monitor`: windows, the surge statistic, topic discovery and the command on a stream.

The pure parts (lmos_jax.apps.trends, .topics, the Monitor's windowing) run on fake
probabilities and synthetic embeddings. The command runs on a tiny random BERT classifier
with three labels made a workdir by `lmos convert --from-hf` (no training), in process, and
once in a subprocess fed line by line on stdin.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import subprocess_env, tiny_classifier_workdir
from lmos_jax import cli
from lmos_jax.apps import monitor as mon_mod
from lmos_jax.apps import topics, trends

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["negative", "neutral", "positive"]
T0 = 1_700_000_000 - 1_700_000_000 % 3600  # an hour boundary (2023-11-14T22:00:00Z)
NEG, NEU = np.array([0.8, 0.1, 0.1]), np.array([0.1, 0.8, 0.1])


# ----------------------------------------------------------------- pure pieces


def test_window_and_time_parsing():
  assert trends.parse_window("1h") == 3600
  assert trends.parse_window("30m") == trends.parse_window("30min") == 1800
  assert trends.parse_window("90s") == trends.parse_window("90") == 90
  assert trends.parse_window("1d") == 86400
  for bad in ("0h", "h", "1w", "-1h"):
    with pytest.raises(ValueError):
      trends.parse_window(bad)
  # ISO with Z, with an offset, without a zone (read as UTC), unix seconds as number/string
  assert trends.parse_time("2023-11-14T22:13:20Z") == 1_700_000_000
  assert trends.parse_time("2023-11-15T00:13:20+02:00") == 1_700_000_000
  assert trends.parse_time("2023-11-14T22:13:20") == 1_700_000_000
  assert trends.parse_time(1_700_000_000) == trends.parse_time("1700000000.0") == 1_700_000_000
  for bad in ("yesterday", True, None, [1], "nan"):
    with pytest.raises(ValueError):
      trends.parse_time(bad)
  # windows start at multiples of the width from the epoch: [start, start + width)
  assert trends.window_start(T0, 3600) == T0
  assert trends.window_start(T0 + 3599.9, 3600) == T0
  assert trends.window_start(T0 + 3600, 3600) == T0 + 3600
  assert trends.window_start(T0 - 0.1, 3600) == T0 - 3600
  assert trends.iso(T0) == "2023-11-14T22:00:00Z"


def stats(k: int, n: int) -> trends.WindowStats:
  s = trends.WindowStats()
  for i in range(n):
    s.add("negative" if i < k else "neutral", 0.0, 0.9 if i < k else 0.1, f"r{i}")
  return s


def test_surge_statistic_matches_a_hand_computed_example():
  # baseline windows with 2, 3, 1 negatives of 20: K = 6, N = 60 -> p0 = 6.5 / 61
  # window 12 of 20: p = 0.6, z = (0.6 - p0) / sqrt(p0 (1 - p0) (1/20 + 1/60)) = 6.193800
  rule = trends.SurgeRule(baseline=3, min_count=10, threshold=4.0, min_rise=0.2)
  history = [stats(9, 10), stats(2, 20), None, stats(3, 20), stats(1, 20)]  # first: too old
  hist = history[:2] + history[3:]  # None (a window without records) is skipped
  t = trends.check_surge(stats(12, 20), hist, rule)
  assert t.tested and t.alert
  assert t.baseline == pytest.approx(0.10655737704918032, abs=1e-12)
  assert t.score == pytest.approx(6.1938002558230085, abs=1e-9)
  assert t.baseline_count == 60 and t.negative_share == 0.6
  # with the empty window in the trailing three, only two windows (40 records) pool
  t2 = trends.check_surge(stats(12, 20), history, rule)
  assert t2.baseline_count == 40
  assert t2.baseline == pytest.approx((4 + 0.5) / 41, abs=1e-12)
  # too few records in the window: not tested; a small rise: tested, no alert
  assert not trends.check_surge(stats(9, 9), hist, rule).tested
  small = trends.check_surge(stats(60, 200), [stats(10, 100)], trends.SurgeRule(1, 10, 2.0, 0.2))
  assert small.tested and small.score > 4 and not small.alert  # 0.30 vs 0.104: rise 0.196
  # a baseline without negatives still has a finite z (p0 = 0.5 / (N + 1))
  assert math.isfinite(trends.check_surge(stats(5, 10), [stats(0, 50)], rule).score)


def feed(monitor, items):
  """items: (seconds after T0, probs, topic, id)."""
  for i, (dt, p, topic, rid) in enumerate(items):
    rec = mon_mod.Record(i + 1, T0 + dt, f"text {i}", topic, rid)
    assert monitor.check_id(rec) is None
    monitor.topic_of([rec], None)
    yield monitor.observe(rec, p, topic)


def test_windows_close_in_order_and_late_records_are_counted():
  m = mon_mod.Monitor(LABELS, 3600, trends.SurgeRule(baseline=2, min_count=1), k_topics=2)
  items = [(10, NEU, "a", "1"), (20, NEG, "b", "2"), (5, NEG, "a", "3"),  # out of order, open
           (3600 + 1, NEU, "a", "4"),  # closes window 0
           (30, NEG, "a", "5"),  # late: window 0 is closed
           (3 * 3600, NEG, "a", "6")]  # closes window 1; window 2 had no records
  out = list(feed(m, items))
  assert [o.get("late", False) for o in out] == [False] * 4 + [True, False]
  assert m.counts.out_of_order == 1 and m.counts.late == 1 and m.counts.classified == 6
  m.close_window()
  rows = [(r.start - T0, r.topic, r.stats.count, r.stats.labels.get("negative", 0))
          for r in m.rows]
  assert rows == [(0, "a", 2, 1), (0, "b", 1, 1), (3600, "a", 1, 0), (3 * 3600, "a", 1, 1)]
  assert out[0]["window_start"] == "2023-11-14T22:00:00Z" and out[3]["window_start"].endswith(
      "23:00:00Z")
  # window 3's baseline is windows 1 and 2 only (window 0 is out of a 2-window baseline)
  assert m.rows[-1].test.baseline_count == 1


def test_a_negative_surge_alerts_in_its_window_with_examples():
  rng = np.random.default_rng(0)
  m = mon_mod.Monitor(LABELS, 3600, trends.SurgeRule(baseline=6, min_count=10), k_topics=2)
  items = []
  for h in range(10):
    for i in range(30):
      share = 0.7 if h == 8 else 0.1  # hour 8 of topic x surges
      for topic in ("x", "y"):
        neg = rng.random() < (share if topic == "x" else 0.1)
        items.append((h * 3600 + i * 100, NEG if neg else NEU, topic, f"{topic}{h}-{i}"))
  list(feed(m, items))
  m.close_window()
  assert [(a["window_start"], a["topic"]) for a in m.alerts] == [(trends.iso(T0 + 8 * 3600), "x")]
  a = m.alerts[0]
  assert a["negative_share"] > 0.5 and a["baseline"] < 0.2 and a["score"] >= 4
  assert 0 < len(a["examples"]) <= trends.MAX_EXAMPLES
  assert all(e.startswith("x8-") for e in a["examples"])


def test_duplicate_ids_and_record_errors():
  m = mon_mod.Monitor(LABELS, 3600, trends.SurgeRule(), k_topics=2)
  assert m.check_id(mon_mod.Record(1, T0, "a", None, "7")) is None
  assert "duplicate id '7'" in m.check_id(mon_mod.Record(2, T0, "b", None, "7"))
  assert mon_mod.parse_record(1, '{"time": 5, "text": "x", "id": 3}').id == "3"
  for line, what in [('{"time": 1, "text": ', "bad JSON"), ("[1]", "a JSON list"),
                     ('{"time": 1}', "missing text"), ('{"time": 1, "text": "  "}', "missing text"),
                     ('{"text": "x"}', "missing time"), ('{"text": "x", "time": "soon"}',
                                                         "neither ISO-8601")]:
    with pytest.raises(ValueError, match=what):
      mon_mod.parse_record(1, line)


# ----------------------------------------------------------------- topics


WORDS = ["alpha", "beta", "gamma"]


def clusters(rng, centers_KD, n_per):
  """Unit vectors near each center (noise 0.15), with texts naming their cluster."""
  x, texts, truth = [], [], []
  for j, c in enumerate(centers_KD):
    v = c + 0.15 * rng.standard_normal((n_per, len(c)))
    x.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    texts += [f"{WORDS[j]} common filler" for _ in range(n_per)]
    truth += [j] * n_per
  return np.concatenate(x).astype(np.float32), texts, np.array(truth)


def test_online_kmeans_ids_stay_stable_across_refits():
  rng = np.random.default_rng(0)
  centers = np.eye(3, 16)  # three orthogonal directions
  km = topics.OnlineKMeans(3, refit_every=60, reservoir_size=200, seed=1)
  first = None
  for step in range(6):
    x, texts, truth = clusters(rng, centers, 20)
    perm = rng.permutation(len(x))
    ids = km.update(x[perm], [texts[i] for i in perm])
    mapping = {int(t): int(i) for t, i in zip(truth[perm], ids)}
    assert len(mapping) == 3 and len(set(mapping.values())) == 3  # pure clusters
    assert all(mapping[int(t)] == int(i) for t, i in zip(truth[perm], ids))
    first = first or mapping
    assert mapping == first, f"ids changed at batch {step}"  # refits at 60, 120, ... points
  assert km.seen == 360
  names = km.names(top=1)
  assert {names[first[j]] for j in range(3)} == set(WORDS)


def test_match_centroids_and_tf_idf_names():
  old = np.eye(3, 4)
  new = old[[2, 0, 1]] * 0.9 + 0.01
  perm = topics.match_centroids(old, new)
  assert perm.tolist() == [1, 2, 0]  # old id j takes new[perm[j]]
  docs = [topics.terms(t) for t in ["Profit rose in the quarter", "profit rose strongly",
                                    "Layoffs announced today", "layoffs and profit"]]
  assert docs[0] == {"profit", "rose"}  # stop words ('in', 'the', 'quarter') dropped
  # topic 0: rose 2/2 * log(4/2) = strongly 1/2 * log(4/1) = 0.693 > profit 2/2 * log(4/3);
  # topic 1: layoffs 1 * log 2 = announced = today 0.5 * log 4; ties sort alphabetically
  names = topics.topic_names(docs, np.array([0, 0, 1, 1]), 2, top=2)
  assert names == {0: "rose, strongly", 1: "announced, layoffs"}


# ----------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny random 3-label BERT classifier as a workdir, no training; one batch width (32),
  so its forward compiles once."""
  return tiny_classifier_workdir(tmp_path_factory.mktemp("monitor"), LABELS, seq_len=32,
                                 buckets="32")


@pytest.fixture(scope="module")
def shared_clf(workdir):
  from lmos_jax.inference import predict as pred
  return pred.load_classifier(workdir)


@pytest.fixture
def in_process(shared_clf, monkeypatch):
  """In-process runs reuse the module's classifier (its batch shapes compile once)."""
  from lmos_jax.inference import predict as pred
  monkeypatch.setattr(pred, "load_classifier", lambda wd: shared_clf)


TEXTS = ["Operating profit rose to EUR 13.1 mn", "The company cut 200 jobs",
         "Sales were flat", "Net loss widened in the quarter"]


def jsonl(records) -> str:
  return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def run_monitor(capsys, *args) -> tuple[int, str]:
  capsys.readouterr()
  rc = cli.main(["monitor", *map(str, args)])
  return rc, capsys.readouterr().err


def test_monitor_writes_every_line_in_place_and_counts_bad_ones(workdir, in_process, capsys,
                                                                tmp_path):
  lines = [{"time": T0 + 10, "text": TEXTS[0], "id": "a"},
           "not json",
           {"time": T0 + 20, "text": TEXTS[1], "id": "a"},  # duplicate id
           {"time": T0 + 30, "id": "c"},  # no text
           {"text": TEXTS[2], "id": "d"},  # no time
           {"time": trends.iso(T0 + 3700), "text": TEXTS[3], "id": "e", "topic": "acme"},
           {"time": T0 + 40, "text": TEXTS[2], "id": "f"},  # late: window 0 closed
           "",
           {"time": T0 + 3800, "text": TEXTS[1]}]
  src = tmp_path / "in.jsonl"
  src.write_text(jsonl(lines))
  out = tmp_path / "out"
  rc, err = run_monitor(capsys, "--workdir", workdir, "--input", src, "--out", out,
                        "--min-count", 1)
  assert rc == 0, err
  preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
  assert [p["line"] for p in preds] == list(range(1, len(lines) + 1))
  errors = {i: p["error"] for i, p in enumerate(preds) if "error" in p}
  assert sorted(errors) == [1, 2, 3, 4, 7]
  assert "bad JSON" in errors[1] and "duplicate id 'a'" in errors[2]
  assert "missing text" in errors[3] and "missing time" in errors[4]
  assert preds[5]["topic"] == "acme" and preds[5]["topic_source"] == "given"
  assert preds[0]["topic_source"] == "discovered" and preds[0]["topic"].startswith("t")
  assert preds[6]["late"] is True and "late" not in preds[8]
  for p in (preds[0], preds[5], preds[8]):
    assert p["label"] in LABELS and abs(sum(p["probs"].values()) - 1) < 1e-5
  assert ("9 lines, 4 classified" in err and "bad json 1" in err and "duplicate id 1" in err
          and "missing text 1" in err and "missing time 1" in err and "late 1" in err
          and "other 1" in err)
  assert (out / "trends.csv").read_text().startswith(
      "window_start,topic,topic_source,topic_name,count,negative,neutral,positive")
  with (out / "trends.csv").open() as f:
    trend = list(csv.DictReader(f))
  assert sum(int(r["count"]) for r in trend) == 3  # records a, e and the last; f was late
  assert {r["topic_source"] for r in trend if r["topic"] == "acme"} == {"given"}
  report = (out / "report.html").read_text()
  assert report.count("data:image/png;base64,") == len({r["topic"] for r in trend})
  assert "duplicate id</td><td>1" in report and "late</td><td>1" in report

  # a non-empty --out is refused (exit 2, one line) unless --force
  rc, err = run_monitor(capsys, "--workdir", workdir, "--input", src, "--out", out)
  assert rc == 2 and "is not empty" in err and "--force" in err and err.count("\n") == 1
  rc, err = run_monitor(capsys, "--workdir", workdir, "--input", src, "--out", out, "--force")
  assert rc == 0, err


@pytest.mark.parametrize("args,message", [
    (["--window", "1w"], "--window '1w'"),
    (["--follow", "--input", "-"], "--follow tails a file"),
    (["--idle-exit", "1"], "--idle-exit applies only with --follow"),
    (["--input", "nowhere.jsonl"], "no such file"),
    (["--threshold", "x"], "--threshold"),
])
def test_bad_arguments_are_one_line_before_the_model(workdir, capsys, tmp_path, monkeypatch,
                                                    args, message):
  from lmos_jax.inference import predict as pred
  monkeypatch.setattr(pred, "load_classifier", lambda wd: pytest.fail("model loaded"))
  monkeypatch.chdir(tmp_path)
  (tmp_path / "in.jsonl").write_text("")
  base = {"--input": "in.jsonl", "--out": "out"}
  argv = ["--workdir", str(workdir)]
  for flag, value in base.items():
    if flag not in args:
      argv += [flag, value]
  rc, err = run_monitor(capsys, *argv, *args)
  assert rc == 2 and message in err and err.count("\n") == 1, err
  assert not (tmp_path / "out").exists()


def test_follow_reads_lines_appended_while_it_runs(workdir, in_process, capsys, tmp_path):
  src = tmp_path / "grow.jsonl"
  src.write_text(jsonl([{"time": T0 + 1, "text": TEXTS[0], "topic": "x"}]))

  def append():
    time.sleep(0.5)
    with src.open("a") as f:
      f.write(json.dumps({"time": T0 + 2, "text": TEXTS[1], "topic": "x"}) + "\n")
      f.write('{"time": ' + str(T0 + 3) + ', "text": "half a ')  # completed later
      f.flush()
      time.sleep(0.3)
      f.write('line", "topic": "x"}\n')
  writer = threading.Thread(target=append)
  writer.start()
  out = tmp_path / "out"
  rc, err = run_monitor(capsys, "--workdir", workdir, "--input", src, "--out", out,
                        "--follow", "--idle-exit", "1.5")
  writer.join()
  assert rc == 0, err
  preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
  assert [p["text"] for p in preds] == [TEXTS[0], TEXTS[1], "half a line"]


def test_stdin_predictions_appear_before_stdin_closes(workdir, tmp_path):
  out = tmp_path / "out"
  proc = subprocess.Popen(
      [sys.executable, "-m", "lmos_jax.cli", "monitor", "--workdir", str(workdir), "--input",
       "-", "--out", str(out)], stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
      env=subprocess_env(1, PYTHONPATH=str(ROOT)))
  preds = out / "predictions.jsonl"
  try:
    for i, text in enumerate(TEXTS[:2]):
      proc.stdin.write((json.dumps({"time": T0 + i, "text": text, "topic": "x"}) + "\n").encode())
      proc.stdin.flush()
      deadline = time.monotonic() + 120  # model load and compile on a busy machine
      while time.monotonic() < deadline and proc.poll() is None:
        if preds.is_file() and len(preds.read_text().splitlines()) == i + 1:
          break
        time.sleep(0.05)
      assert proc.poll() is None, proc.stderr.read().decode()
      got = [json.loads(x) for x in preds.read_text().splitlines()]
      assert [g["text"] for g in got] == TEXTS[:i + 1]  # out while stdin is still open
  finally:
    proc.stdin.close()
  assert proc.wait(timeout=120) == 0
  err = proc.stderr.read().decode()
  assert "2 lines, 2 classified" in err, err
  assert (out / "report.html").is_file()
