"""`lmos monitor` on synthetic streams of Financial PhraseBank sentences: does it catch an
injected surge of negative opinion, quickly, in the right topic, and stay quiet otherwise?

PhraseBank has no timestamps or entities, so the streams are made here from the labelled dev
sentences (--dev, default $LMOS_DATA_DIR/apps/finphrasebank/allagree/dev.tsv, the subset the
configs/finsent.py:allagree classifier was trained and evaluated on): every hour, each topic
gets a count of texts drawn uniformly from --rate +-15% (20 to 28 at the default 24), at
uniform times within the hour, each drawn (with replacement) from the dev sentences of a gold label picked with the topic's label mix
(negative 15%, neutral 60%, positive 25%). The records carry `time`, `text`, `topic`, `id`.

  surge    --days days of --topics topics; in one topic, from hour --surge-start for
           --surge-hours hours, the mix becomes negative 65%, neutral 25%, positive 10%.
  control  --control-days days of the same topics and rates, no surge.

Each stream runs through the real command, `lmos monitor --workdir W --input STREAM --out DIR
--window 1h --baseline 24` (its defaults for --min-count, --threshold and --min-rise), in a
fresh subprocess timed from launch to exit. Printed: the detection delay (windows from the
surge's first window to the first alert naming the surge topic; 0 = the first surge window
itself alerts, when it closes), false alerts per day (alerts outside the surge's topic and
windows), the per-topic negative share by day (classifier-predicted, from trends.csv),
and throughput: texts/s end to end (launch to exit, model load and compiles included) and
the monitor's own loop rate (after the model is loaded), with the fraction of the host's f32
matmul peak (measured by lmos_jax.train.metrics.measure_cpu_peak in this run) that the loop
rate means in useful encoder FLOPs: per text of n tokens, 2 x matmul params x n + 4 x layers
x d_model x n^2 (attention scores and values; packing padding not counted).

Run: python3 experiments/opinion_monitor.py --workdir runs/finsent [--out DIR]
Results: OUT/opinion_monitor.json; each monitor's outputs under OUT/{surge,control}/.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASE_MIX = {"negative": 0.15, "neutral": 0.60, "positive": 0.25}
SURGE_MIX = {"negative": 0.65, "neutral": 0.25, "positive": 0.10}
START = 1_735_689_600  # 2025-01-01T00:00:00Z, a window boundary for any whole-hour window


def read_dev(path: Path) -> dict[str, list[str]]:
  """label -> texts of a `text<TAB>label` TSV with a header row."""
  by_label: dict[str, list[str]] = defaultdict(list)
  with path.open(encoding="utf-8") as f:
    rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    for r in rows:
      by_label[r["label"]].append(r["text"])
  return dict(by_label)


def make_stream(texts: dict[str, list[str]], hours: int, topics: list[str], rate: float,
                surge: tuple[str, int, int] | None, rng: np.random.Generator) -> list[dict]:
  """Records in time order; surge = (topic, first hour, hours) or None."""
  recs = []
  labels = list(BASE_MIX)
  for h in range(hours):
    for topic in topics:
      hot = surge is not None and topic == surge[0] and surge[1] <= h < surge[1] + surge[2]
      mix = SURGE_MIX if hot else BASE_MIX
      for _ in range(int(rng.integers(math.ceil(0.85 * rate), math.floor(1.15 * rate) + 1))):
        label = labels[rng.choice(3, p=[mix[k] for k in labels])]
        pool = texts[label]
        recs.append({"time": START + h * 3600 + float(rng.uniform(0, 3600)),
                     "text": pool[rng.integers(len(pool))], "topic": topic, "gold": label})
  recs.sort(key=lambda r: r["time"])
  for i, r in enumerate(recs):
    r["id"] = f"r{i}"
    r["time"] = round(r["time"], 3)
  return recs


def run_monitor(workdir: str, stream: Path, out: Path) -> tuple[float, str]:
  """(seconds from launch to exit, the monitor's stderr) of `lmos monitor` on the stream."""
  cmd = [sys.executable, "-m", "lmos_jax.cli", "monitor", "--workdir", workdir, "--input",
         str(stream), "--out", str(out), "--force", "--window", "1h", "--baseline", "24"]
  env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    sys.exit(f"lmos monitor failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return wall, proc.stderr


def loop_rate(stderr: str) -> float:
  """The monitor's own texts/s (its summary line)."""
  line = [x for x in stderr.splitlines() if x.startswith("lmos monitor:")][-1]
  return float(line.split(" texts/s")[0].rsplit("(", 1)[1])


def read_alerts(out: Path) -> list[dict]:
  return [json.loads(x) for x in (out / "alerts.jsonl").read_text().splitlines()]


def score_alerts(alerts: list[dict], surge: tuple[str, int, int] | None, days: float
                 ) -> tuple[int | None, float, int]:
  """(detection delay in windows or None, false alerts per day, false alerts)."""
  from lmos_jax.apps.trends import parse_time
  delay, false = None, 0
  for a in alerts:
    hour = int((parse_time(a["window_start"]) - START) // 3600)
    in_surge = surge is not None and a["topic"] == surge[0] and (
        surge[1] <= hour < surge[1] + surge[2])
    if in_surge:
      delay = hour - surge[1] if delay is None else min(delay, hour - surge[1])
    else:
      false += 1
  return delay, false / days, false


def daily_negative_share(out: Path) -> dict[str, list[float]]:
  """topic -> predicted negative share per day (records pooled over the day's windows)."""
  from lmos_jax.apps.trends import parse_time
  neg: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
  cnt: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
  with (out / "trends.csv").open() as f:
    for r in csv.DictReader(f):
      day = int((parse_time(r["window_start"]) - START) // 86400)
      n = int(r["count"])
      neg[r["topic"]][day] += float(r["negative"]) * n
      cnt[r["topic"]][day] += n
  return {t: [neg[t][d] / cnt[t][d] for d in sorted(cnt[t])] for t in sorted(cnt)}


def encoder_flops(workdir: str, texts: list[str]) -> float:
  """Useful forward FLOPs of the encoder over the texts: each at its own token count (the
  padding its packed rows carry is not counted, so this is a lower bound of the work done)."""
  from lmos_jax.data.encoder import encode_for_classifier, row_lengths
  from lmos_jax.workdir import read_config, read_tokenizer
  cfg = read_config(Path(workdir))
  rows = encode_for_classifier(read_tokenizer(Path(workdir)), texts, None, cfg.data.seq_len)
  n = row_lengths(rows).astype(np.float64)
  m = cfg.model
  matmul_params = m.num_layers * (4 * m.d_model ** 2 + 2 * m.d_model * m.d_ff)
  return float(np.sum(2 * matmul_params * n + 4 * m.num_layers * m.d_model * n ** 2))


def write_jsonl(recs: list[dict], path: Path) -> None:
  with path.open("w", encoding="utf-8") as f:
    for r in recs:
      f.write(json.dumps({k: v for k, v in r.items() if k != "gold"}) + "\n")


def main() -> int:
  from lmos_jax.config.datadir import data_file
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, help="a finetuned configs/finsent.py workdir")
  ap.add_argument("--dev", default=None, help="labelled TSV the stream texts are drawn from")
  ap.add_argument("--out", default="runs/opinion_monitor")
  ap.add_argument("--topics", default="banks,retail,telecom")
  ap.add_argument("--rate", type=float, default=24.0, help="mean texts per hour per topic")
  ap.add_argument("--days", type=float, default=3.0)
  ap.add_argument("--surge-topic", default="telecom")
  ap.add_argument("--surge-start", type=int, default=40, help="hour of the surge's start")
  ap.add_argument("--surge-hours", type=int, default=4)
  ap.add_argument("--control-days", type=float, default=7.0)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  dev = Path(args.dev or data_file("apps/finphrasebank/allagree/dev.tsv"))
  if not dev.is_file():
    sys.exit(f"--dev {dev}: no such file (set LMOS_DATA_DIR or give --dev)")
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  texts = read_dev(dev)
  topics = args.topics.split(",")
  if args.surge_topic not in topics:
    sys.exit(f"--surge-topic {args.surge_topic!r} is not one of --topics {topics}")
  rng = np.random.default_rng(args.seed)
  surge = (args.surge_topic, args.surge_start, args.surge_hours)
  runs = {"surge": (make_stream(texts, round(args.days * 24), topics, args.rate, surge, rng),
                    surge, args.days),
          "control": (make_stream(texts, round(args.control_days * 24), topics, args.rate, None,
                                  rng), None, args.control_days)}
  from lmos_jax.train.metrics import measure_cpu_peak
  peak = measure_cpu_peak(n=2048, repeats=5)  # best of 5: other jobs on the cores lower it
  results = {"dev": str(dev.name), "topics": topics, "rate_per_topic_hour": args.rate,
             "peak_flops": peak, "cpus": os.cpu_count()}
  for name, (recs, surge_spec, days) in runs.items():
    stream = out / f"{name}.jsonl"
    write_jsonl(recs, stream)
    wall, stderr = run_monitor(args.workdir, stream, out / name)
    alerts = read_alerts(out / name)
    delay, false_per_day, false = score_alerts(alerts, surge_spec, days)
    rate = loop_rate(stderr)
    flops = encoder_flops(args.workdir, [r["text"] for r in recs])
    surge_counts = [sum(1 for r in recs if r["topic"] == surge[0]
                        and int((r["time"] - START) // 3600) == surge[1] + h)
                    for h in range(surge[2])] if surge_spec else []
    res = {"texts": len(recs), "days": days, "alerts": len(alerts),
           "detection_delay_windows": delay, "false_alerts": false,
           "false_alerts_per_day": false_per_day, "wall_s": wall,
           "end_to_end_texts_per_s": len(recs) / wall, "loop_texts_per_s": rate,
           "loop_fraction_of_peak": rate * flops / len(recs) / peak,
           "gflop_per_text": flops / len(recs) / 1e9,
           "surge_texts_per_hour": surge_counts,
           "daily_negative_share": daily_negative_share(out / name),
           "alert_list": [(a["window_start"], a["topic"], a["negative_share"], a["score"])
                          for a in alerts],
           "summary": stderr.strip().splitlines()[-1]}
    results[name] = res
    print(f"== {name}: {len(recs)} texts over {days:g} days, topics {topics}")
    print(f"   {res['summary']}")
    if surge_spec:
      print(f"   surge: {surge[0]} hours {surge[1]}-{surge[1] + surge[2] - 1}, texts/hour "
            f"{surge_counts}; detection delay {delay} windows")
    print(f"   alerts {len(alerts)}, false alerts {false} ({false_per_day:.2f}/day)")
    for a in res["alert_list"]:
      print(f"     {a[0]} {a[1]}: negative share {a[2]:.2f}, z {a[3]:.1f}")
    for topic, shares in res["daily_negative_share"].items():
      print(f"   {topic:>8} negative share by day: " + " ".join(f"{s:.2f}" for s in shares))
    print(f"   throughput: end to end {res['end_to_end_texts_per_s']:.1f} texts/s "
          f"({wall:.1f} s launch to exit), loop {rate:.1f} texts/s = "
          f"{res['gflop_per_text']:.3f} GFLOP/text x {rate:.1f} = "
          f"{100 * res['loop_fraction_of_peak']:.1f}% of the measured {peak / 1e9:.1f} GFLOP/s "
          "f32 matmul peak")
  (out / "opinion_monitor.json").write_text(json.dumps(results, indent=1))
  print(f"results: {out / 'opinion_monitor.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
