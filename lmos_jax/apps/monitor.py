"""`lmos monitor --workdir W --input STREAM --out DIR`: financial opinion monitoring. Classifies
a stream of timestamped texts with a finetuned negative/neutral/positive classifier, tracks
the opinion per topic per time window, and alerts when a topic's negative share surges.

STREAM is a JSONL file, or `-` (stdin, read as it arrives); `--follow` tails a file that is
being appended to (`--idle-exit S` ends the run after S seconds without a new line). Each line
is `{"time": ISO-8601 or unix seconds, "text": ..., "topic"?: ..., "id"?: ...}`. A record's
`topic` is used when given; otherwise topics are discovered by online k-means over the
classifier's sentence embeddings (lmos_jax.apps.topics), and every output says which.

Windows are [k*W, (k+1)*W) of unix time (`--window`, default 1h). The open window is the
latest one seen; it closes when the first record of a later window arrives (or the stream
ends). A record out of order inside the open window is accepted; one for a closed window is
classified and written with `"late": true` but not counted (the window's figures and alerts
are already out), and the run counts it. When a window closes, each topic's window is tested
against its trailing `--baseline` windows (lmos_jax.apps.trends: z-score of the negative share
against the baseline's pooled proportion).

Outputs in DIR, updated as the run goes (each line flushed when its window closes):
  predictions.jsonl  one object per input line, in input order: label, probabilities, window,
                     topic; a bad line (bad JSON, no text or time, a duplicate id) is
                     `{"line": n, "error": ...}` in its place, so no record shifts
  trends.csv         one row per window and topic: count, label shares, mean score, z, alert
  alerts.jsonl       {"window_start", "topic", "negative_share", "baseline", "score",
                     "examples": [ids, or texts when records have no id]}
  report.html        one plot per topic (label shares over time, alerts marked; PNG embedded
                     as base64), the alerts, the topics and the counts of bad or late lines
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np

from lmos_jax.apps.topics import OnlineKMeans
from lmos_jax.apps.trends import (NEGATIVE, SurgeRule, SurgeTest, WindowStats, check_surge, iso,
                                  parse_time, parse_window, sentiment_score, window_start)
from lmos_jax.errors import UserError

# lines classified together (packed into rows, as lmos predict does): a fast stream's groups
# this large fill their rows more tightly than small groups; a slow stream's groups go out as
# soon as no more lines are waiting, so its latency is unchanged
GROUP_ROWS = 1024
REPORT_EVERY_S = 30.0  # report.html is rewritten at most this often while the stream runs
TREND_FIELDS = ["window_start", "topic", "topic_source", "topic_name", "count", "negative",
                "neutral", "positive", "mean_score", "baseline", "z", "alert"]


@dataclasses.dataclass
class Record:
  """A parsed input line: its position, time, text, optional topic and id."""

  line: int
  time: float
  text: str
  topic: str | None = None
  id: str | None = None


def parse_record(line: int, text: str) -> Record:
  """A JSONL line as a Record; ValueError names what is wrong (bad JSON, no text, no time)."""
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"bad JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(obj, dict):
    raise ValueError(f"a JSON {type(obj).__name__}, expected an object")
  body = obj.get("text")
  if not isinstance(body, str) or not body.strip():
    raise ValueError("missing text: expected a non-empty string field 'text'")
  if obj.get("time") is None:
    raise ValueError("missing time: expected 'time' (ISO-8601 or unix seconds)")
  t = parse_time(obj["time"])
  topic = obj.get("topic")
  topic = None if topic is None or str(topic).strip() == "" else str(topic).strip()
  rid = obj.get("id")
  return Record(line, t, body, topic, None if rid is None else str(rid))


# ----------------------------------------------------------------- reading the stream


class FollowFile:
  """`readline()` over a file that is being appended to: waits for each complete line, and
  returns b'' (end of stream) after `idle_exit` seconds without new bytes (None: never)."""

  def __init__(self, path: Path, idle_exit: float | None, poll_s: float = 0.05):
    self.f = path.open("rb")
    self.idle_exit, self.poll_s = idle_exit, poll_s
    self.partial = b""

  def readline(self) -> bytes:
    idle_since = time.monotonic()
    while True:
      chunk = self.f.readline()
      if chunk:
        self.partial += chunk
        if self.partial.endswith(b"\n"):
          line, self.partial = self.partial, b""
          return line
        idle_since = time.monotonic()  # half a line: the writer is still at it
        continue
      if self.idle_exit is not None and time.monotonic() - idle_since >= self.idle_exit:
        line, self.partial = self.partial, b""
        return line  # a last line without a line break, then b''
      time.sleep(self.poll_s)


def line_groups(stream: BinaryIO | FollowFile, size: int) -> Iterator[list[tuple[int, str | None,
                                                                                 str | None]]]:
  """(line number, text, error) in groups: a group goes out when full or shortly after its
  first line when no more are waiting (lmos_jax.inference.inputs.stdin_groups), so a slow
  stream gets its predictions line by line and a fast one in full batches."""
  from lmos_jax.inference.inputs import InputSpec, stdin_groups
  for rows in stdin_groups(stream, size, InputSpec()):
    yield [(r.line, r.text_a if r.error is None else None, r.error) for r in rows]


# ----------------------------------------------------------------- the monitor


@dataclasses.dataclass
class Counts:
  """Lines that did not make it into the trends, by cause, for the end summary and report."""

  lines: int = 0
  classified: int = 0
  bad_json: int = 0
  missing_text: int = 0
  missing_time: int = 0  # also an unreadable time
  duplicate_id: int = 0
  other: int = 0  # not UTF-8, too long, empty line
  late: int = 0  # for a window already closed: classified, written, not counted
  out_of_order: int = 0  # earlier than a previous record but in the open window: counted

  def add_error(self, message: str) -> None:
    kind = ("bad_json" if message.startswith(("bad JSON", "a JSON")) else
            "missing_text" if message.startswith("missing text") else
            "missing_time" if "time" in message else
            "duplicate_id" if message.startswith("duplicate id") else "other")
    setattr(self, kind, getattr(self, kind) + 1)


class Outputs:
  """The files of --out, written and flushed as the run goes."""

  def __init__(self, out: Path):
    self.dir = out
    self.predictions = (out / "predictions.jsonl").open("w", encoding="utf-8")
    self.alerts = (out / "alerts.jsonl").open("w", encoding="utf-8")
    self.trends_file = (out / "trends.csv").open("w", encoding="utf-8", newline="")
    self.trends = csv.DictWriter(self.trends_file, TREND_FIELDS)
    self.trends.writeheader()

  def flush(self) -> None:
    for f in (self.predictions, self.alerts, self.trends_file):
      f.flush()

  def close(self) -> None:
    for f in (self.predictions, self.alerts, self.trends_file):
      f.close()


@dataclasses.dataclass
class TrendRow:
  """One closed window of one topic, with its surge test (what trends.csv and the plots show)."""

  start: float
  topic: str
  stats: WindowStats
  test: SurgeTest


class Monitor:
  """Windows, topics and surge tests over classified records (no model: `observe` takes the
  probabilities, and embeddings for records without a topic)."""

  def __init__(self, labels: Sequence[str], width_s: float, rule: SurgeRule, k_topics: int,
               outputs: Outputs | None = None, seed: int = 0):
    self.labels = list(labels)
    self.width, self.rule, self.outputs = width_s, rule, outputs
    self.kmeans = OnlineKMeans(k_topics, seed=seed)
    self.counts = Counts()
    self.ids: set[str] = set()
    self.current: float | None = None  # start of the open window
    self.latest = -float("inf")  # latest record time seen
    self.open: dict[str, WindowStats] = {}  # topic -> the open window's tallies
    self.history: dict[str, dict[float, WindowStats]] = {}  # topic -> closed windows
    self.sources: dict[str, str] = {}  # topic -> given | discovered
    self.rows: list[TrendRow] = []
    self.alerts: list[dict] = []

  # -- input

  def check_id(self, rec: Record) -> str | None:
    """An error for a record whose id was seen before (the first one counts)."""
    if rec.id is None:
      return None
    if rec.id in self.ids:
      return f"duplicate id {rec.id!r}: the first record with this id was kept"
    self.ids.add(rec.id)
    return None

  def topic_of(self, recs: Sequence[Record], emb_ND: np.ndarray | None) -> list[str]:
    """Each record's topic: its own, else its discovered topic `t<id>` (k-means learns from
    the embeddings of the records without one)."""
    topics = [r.topic for r in recs]
    need = [i for i, t in enumerate(topics) if t is None]
    if need:
      ids = self.kmeans.update(emb_ND[need], [recs[i].text for i in need])
      for i, j in zip(need, ids):
        topics[i] = f"t{int(j)}"
        self.sources[topics[i]] = "discovered"
    for r in recs:
      if r.topic is not None:
        self.sources[r.topic] = "given"
    return topics

  def observe(self, rec: Record, probs: np.ndarray, topic: str) -> dict:
    """Counts one classified record in its window (closing windows it passes) and returns
    its predictions.jsonl object."""
    self.counts.classified += 1
    p = {name: float(x) for name, x in zip(self.labels, probs)}
    k = int(np.argmax(probs))
    start = window_start(rec.time, self.width)
    out: dict[str, Any] = {"line": rec.line}
    if rec.id is not None:
      out["id"] = rec.id
    out.update(time=iso(rec.time), window_start=iso(start), topic=topic,
               topic_source=self.sources.get(topic, "given"), label=self.labels[k],
               score=round(p[self.labels[k]], 6),
               probs={n: round(v, 6) for n, v in p.items()}, text=rec.text)
    if self.current is not None and start < self.current:
      self.counts.late += 1
      out["late"] = True
      return out
    if rec.time < self.latest:
      self.counts.out_of_order += 1
    self.latest = max(self.latest, rec.time)
    if self.current is not None and start > self.current:
      self.close_window()
    self.current = start
    self.open.setdefault(topic, WindowStats()).add(
        self.labels[k], sentiment_score(p), p.get(NEGATIVE, 0.0),
        rec.id if rec.id is not None else rec.text)
    return out

  # -- windows

  def close_window(self) -> None:
    """Tests and writes out every topic of the open window, then forgets it."""
    if self.current is None:
      return
    names = self.topic_names()
    for topic in sorted(self.open):
      stats = self.open[topic]
      past = self.history.setdefault(topic, {})
      trail = [past.get(self.current - i * self.width) for i in range(self.rule.baseline, 0, -1)]
      test = check_surge(stats, trail, self.rule)
      past[self.current] = stats
      for old in [s for s in past if s < self.current - self.rule.baseline * self.width]:
        del past[old]  # only the baseline's windows are ever read again
      self.rows.append(TrendRow(self.current, topic, stats, test))
      self._write_row(self.rows[-1], names.get(topic, ""))
      if test.alert:
        alert = {"window_start": iso(self.current), "topic": topic,
                 "topic_source": self.sources.get(topic, "given"),
                 "topic_name": names.get(topic, topic),
                 "negative_share": round(test.negative_share, 6),
                 "baseline": round(test.baseline, 6), "score": round(test.score, 4),
                 "count": stats.count, "examples": [e for _, e in stats.examples]}
        self.alerts.append(alert)
        if self.outputs:
          self.outputs.alerts.write(json.dumps(alert, ensure_ascii=False) + "\n")
    self.open = {}
    if self.outputs:
      self.outputs.flush()

  def _write_row(self, row: TrendRow, name: str) -> None:
    if not self.outputs:
      return
    s = row.stats
    self.outputs.trends.writerow({
        "window_start": iso(row.start), "topic": row.topic,
        "topic_source": self.sources.get(row.topic, "given"), "topic_name": name,
        "count": s.count, **{n: round(s.share(n), 6) for n in self.labels},
        "mean_score": round(s.mean_score, 6), "baseline": round(row.test.baseline, 6),
        "z": round(row.test.score, 4) if row.test.tested else "", "alert": int(row.test.alert)})

  def topic_names(self) -> dict[str, str]:
    """topic -> a readable name: a given topic is its own name; a discovered one its terms."""
    names = {t: t for t, src in self.sources.items() if src == "given"}
    names.update({f"t{j}": n for j, n in self.kmeans.names().items()})
    return names


# ----------------------------------------------------------------- the report


def plot_topic(rows: Sequence[TrendRow], labels: Sequence[str], title: str) -> str:
  """PNG (base64) of one topic: label shares per window, alerts marked, counts below."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.dates as mdates
  import matplotlib.pyplot as plt
  from datetime import datetime, timezone
  x = [datetime.fromtimestamp(r.start, timezone.utc) for r in rows]
  fig, (ax, axn) = plt.subplots(2, 1, figsize=(9, 4.2), sharex=True,
                                gridspec_kw={"height_ratios": [3, 1]})
  colours = {"negative": "tab:red", "neutral": "tab:gray", "positive": "tab:green"}
  for name in labels:
    ax.plot(x, [r.stats.share(name) for r in rows], marker=".", lw=1, label=name,
            color=colours.get(name))
  ax.plot(x, [r.test.baseline for r in rows], ls="--", lw=1, color="tab:red", alpha=0.5,
          label="negative baseline")
  hits = [(xi, r.stats.share(NEGATIVE)) for xi, r in zip(x, rows) if r.test.alert]
  if hits:
    ax.scatter(*zip(*hits), s=90, facecolors="none", edgecolors="black", zorder=5,
               label="alert")
  ax.set_ylim(0, 1)
  ax.set_ylabel("share")
  ax.set_title(title)
  ax.legend(fontsize=7, ncol=5, loc="upper left")
  axn.bar(x, [r.stats.count for r in rows], width=0.8 * (rows[1].start - rows[0].start) / 86400
          if len(rows) > 1 else 0.02, color="tab:blue")
  axn.set_ylabel("texts")
  axn.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))
  fig.autofmt_xdate()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
  plt.close(fig)
  return base64.b64encode(buf.getvalue()).decode()


def write_report(mon: Monitor, path: Path, seconds: float) -> None:
  """report.html: the counts, the alerts, and one plot per topic (written to a temporary
  file first, so a reader never sees half a report)."""
  names = mon.topic_names()
  c = dataclasses.asdict(mon.counts)
  esc = html.escape
  parts = ["<!doctype html><html><head><meta charset='utf-8'><title>lmos monitor</title>"
           "<style>body{font-family:sans-serif;max-width:960px}td,th{padding:2px 8px;"
           "text-align:left}</style></head><body><h1>lmos monitor</h1>",
           f"<p>{c['lines']} lines, {c['classified']} classified in {seconds:.1f} s; "
           f"{len(mon.alerts)} alerts.</p><h2>Input problems</h2><table>"]
  parts += [f"<tr><td>{esc(k.replace('_', ' '))}</td><td>{v}</td></tr>" for k, v in c.items()
            if k not in ("lines", "classified")]
  parts.append("</table><h2>Alerts</h2><table><tr><th>window</th><th>topic</th>"
               "<th>negative share</th><th>baseline</th><th>z</th><th>examples</th></tr>")
  parts += [f"<tr><td>{esc(a['window_start'])}</td><td>{esc(a['topic_name'])}</td>"
            f"<td>{a['negative_share']:.2f}</td><td>{a['baseline']:.2f}</td>"
            f"<td>{a['score']:.1f}</td><td>{esc('; '.join(a['examples'][:3]))}</td></tr>"
            for a in mon.alerts]
  parts.append("</table><h2>Topics</h2>")
  by_topic: dict[str, list[TrendRow]] = {}
  for r in mon.rows:
    by_topic.setdefault(r.topic, []).append(r)
  for topic in sorted(by_topic):
    src = mon.sources.get(topic, "given")
    title = f"{topic} ({src})" + (f": {names[topic]}" if src == "discovered" else "")
    png = plot_topic(by_topic[topic], mon.labels, title)
    parts.append(f"<h3>{esc(title)}</h3><img src='data:image/png;base64,{png}'>")
  parts.append("</body></html>")
  tmp = path.with_suffix(".tmp")
  tmp.write_text("\n".join(parts), encoding="utf-8")
  os.replace(tmp, path)


# ----------------------------------------------------------------- the command


def process_group(mon: Monitor, clf, group: list[tuple[int, str | None, str | None]],
                  batch_size: int, widths: Sequence[int]) -> list[dict]:
  """Parses, classifies and observes one group of lines; one output object per line."""
  from lmos_jax.inference.predict import classify_embed_rows, classify_rows
  out: list[dict | None] = [None] * len(group)
  recs, where = [], []
  for i, (line, text, error) in enumerate(group):
    mon.counts.lines += 1
    if error is None:
      try:
        rec = parse_record(line, text)
        error = mon.check_id(rec)
      except ValueError as e:
        error = str(e)
    if error is not None:
      mon.counts.add_error(error)
      out[i] = {"line": line, "error": error}
    else:
      recs.append(rec)
      where.append(i)
  if recs:
    texts = [r.text for r in recs]
    if any(r.topic is None for r in recs):
      probs, emb = classify_embed_rows(clf, texts, None, batch_size, widths)
    else:
      probs, emb = classify_rows(clf, texts, None, batch_size, widths), None
    topics = mon.topic_of(recs, emb)
    for i, r, p, t in zip(where, recs, probs, topics):
      out[i] = mon.observe(r, p, t)
  return out


def prepare_out(out: Path, force: bool) -> None:
  """--out: created; an existing non-empty folder only with --force (its files replaced)."""
  if out.exists() and not out.is_dir():
    raise UserError(f"--out {out}: exists and is not a directory; give a new directory")
  if out.is_dir() and any(out.iterdir()) and not force:
    raise UserError(f"--out {out}: exists and is not empty; give a new directory, or --force "
                    "to replace its monitor files")
  if not out.parent.is_dir():
    raise UserError(f"--out {out}: its parent directory {out.parent} does not exist")
  out.mkdir(exist_ok=True)


def summary(mon: Monitor, seconds: float) -> str:
  c = mon.counts
  rate = c.classified / seconds if seconds > 0 else float("inf")
  bad = {k: v for k, v in dataclasses.asdict(c).items()
         if k not in ("lines", "classified") and v}
  return (f"lmos monitor: {c.lines} lines, {c.classified} classified in {seconds:.2f} s "
          f"({rate:.1f} texts/s), {len(mon.rows)} window-topic rows, {len(mon.alerts)} alerts"
          + ("; " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in bad.items())
             if bad else "; no bad lines"))


def run(args) -> int:
  """Checks every argument, then loads the model and monitors the stream."""
  from lmos_jax.inference.predict import batch_widths, classifier_config, load_classifier
  from lmos_jax.workdir import label_names
  wd = Path(args.workdir)
  cfg = classifier_config(wd)
  labels = label_names(wd)
  if NEGATIVE not in labels:
    raise UserError(f"--workdir {wd}: labels {labels} have no {NEGATIVE!r}; the monitor needs "
                    "a negative/neutral/positive classifier (e.g. configs/finsent.py)")
  try:
    width = parse_window(args.window)
  except ValueError as e:
    raise UserError(f"--window {e}") from None
  if args.input == "-" and args.follow:
    raise UserError("--follow tails a file; with --input - (stdin) the stream already runs "
                    "until stdin closes")
  if args.idle_exit is not None and not args.follow:
    raise UserError("--idle-exit applies only with --follow")
  src = None if args.input == "-" else Path(args.input)
  if src is not None and not src.is_file():
    raise UserError(f"--input {args.input}: no such file")
  out = Path(args.out)
  prepare_out(out, args.force)
  rule = SurgeRule(args.baseline, args.min_count, args.threshold, args.min_rise)
  outputs = Outputs(out)
  mon = Monitor(labels, width, rule, args.topics, outputs)
  clf = load_classifier(wd)
  widths = batch_widths(cfg)
  stream: Any = (sys.stdin.buffer if src is None else
                 FollowFile(src, args.idle_exit) if args.follow else src.open("rb"))
  start = last_report = time.perf_counter()
  try:
    for group in line_groups(stream, GROUP_ROWS):
      for rec in process_group(mon, clf, group, args.batch_size, widths):
        outputs.predictions.write(json.dumps(rec, ensure_ascii=False) + "\n")
      outputs.predictions.flush()
      if time.perf_counter() - last_report > REPORT_EVERY_S:
        write_report(mon, out / "report.html", time.perf_counter() - start)
        last_report = time.perf_counter()
    mon.close_window()
    seconds = time.perf_counter() - start
    write_report(mon, out / "report.html", seconds)
  finally:
    outputs.close()
  print(summary(mon, seconds), file=sys.stderr, flush=True)
  return 0


def main(argv: list[str]) -> int:
  from lmos_jax.errors import ArgumentParser, existing_dir, number
  ap = ArgumentParser(prog=argv[0], description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, type=existing_dir("config.json"),
                  help="workdir of a negative/neutral/positive classifier")
  ap.add_argument("--input", required=True,
                  help="JSONL stream of {time, text, topic?, id?}; - reads stdin as it arrives")
  ap.add_argument("--out", required=True, help="output directory (new or empty)")
  ap.add_argument("--force", action="store_true", help="replace the files of a non-empty --out")
  ap.add_argument("--window", default="1h", help="window width: 1h, 30m, 90s, 1d (default 1h)")
  ap.add_argument("--baseline", type=number(int, 1), default=24,
                  help="trailing windows pooled into a topic's baseline (default 24)")
  ap.add_argument("--min-count", type=number(int, 1), default=10,
                  help="records a window (and its baseline) needs to be tested (default 10)")
  ap.add_argument("--threshold", type=number(float, 0.0), default=4.0,
                  help="z-score of the negative share at which a window alerts (default 4)")
  ap.add_argument("--min-rise", type=number(float, 0.0, 1.0), default=0.2,
                  help="least rise of the negative share over the baseline for an alert "
                       "(default 0.2)")
  ap.add_argument("--topics", type=number(int, 1), default=4,
                  help="topics discovered for records without a topic field (default 4)")
  ap.add_argument("--follow", action="store_true",
                  help="keep reading --input as it grows (like tail -f)")
  ap.add_argument("--idle-exit", type=number(float, 0.0), default=None,
                  help="with --follow: stop after this many seconds without a new line")
  ap.add_argument("--batch-size", type=number(int, 1), default=64,
                  help="texts per classifier batch (default 64)")
  return run(ap.parse_args(argv[1:]))  # a UserError: one line and exit 2 from lmos_jax.cli
