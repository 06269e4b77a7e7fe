"""`lmos report WORKDIR [WORKDIR...]`: the plots a researcher would otherwise make by hand.

Reads each WORKDIR/metrics.jsonl (written by process 0 of `lmos train`) and config.json, and
writes report.png (train/eval loss, learning rate, tokens/s, MFU, grad norm; one colour per
run) and report.html (the PNG, a summary table and the config keys that differ between runs).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lmos_jax.errors import ArgumentParser, UserError, number

# (metric key in metrics.jsonl, panel title, y scale factor, log y axis)
PANELS = (
    ("loss", "train loss", 1.0, False),
    ("eval_loss", "eval loss", 1.0, False),
    ("lr", "learning rate", 1.0, False),
    ("tokens_per_sec", "tokens / s", 1.0, False),
    ("mfu", "MFU (%)", 100.0, False),
    ("grad_norm", "grad norm", 1.0, True),
)


class ReportError(UserError, ValueError):
  """A workdir cannot be reported; the message names it and what is missing."""


@dataclasses.dataclass
class RunLog:
  """One run's logged rows (one per logged step, the latest value wins) and its config."""

  name: str
  workdir: Path
  rows: list[dict[str, float]]
  config: dict[str, Any] | None
  notes: list[str]


def read_metrics(path: Path) -> tuple[list[dict[str, float]], list[str]]:
  """Rows sorted by step. A resumed run may re-log steps after an older checkpoint: the
  last row for a step wins. A torn final line (a killed writer) is dropped with a note."""
  try:
    lines = path.read_bytes().decode("utf-8").splitlines()
  except UnicodeDecodeError as e:
    raise ReportError(f"{path} is not UTF-8 text (byte {e.start}); is it a metrics.jsonl "
                      "that `lmos train` wrote?") from None
  by_step: dict[int, dict[str, float]] = {}
  notes = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if i == len(lines) - 1:
        notes.append(f"{path}: dropped a torn last line ({line[:40]!r})")
        continue
      raise ReportError(f"{path} line {i + 1} is not JSON: {line[:80]!r}") from None
    if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
      raise ReportError(f"{path} line {i + 1} has no numeric 'step' field: {line[:80]!r}")
    by_step[int(row["step"])] = row
  return [by_step[s] for s in sorted(by_step)], notes


def read_config(path: Path) -> dict:
  try:
    config = json.loads(path.read_bytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ReportError(f"{path} is not valid JSON ({e}); restore the file `lmos train` wrote "
                      "or remove it (the report then shows no config)") from None
  if not isinstance(config, dict):
    raise ReportError(f"{path} is not a JSON object; restore the file `lmos train` wrote")
  return config


def load_run(workdir: str | Path, name: str | None = None) -> RunLog:
  wd = Path(workdir)
  path = wd / "metrics.jsonl"
  if not path.is_file():
    raise ReportError(f"{wd} has no metrics.jsonl; give a `lmos train --workdir` directory "
                      "(in multi-host runs process 0's workdir holds it)")
  rows, notes = read_metrics(path)
  if not rows:
    raise ReportError(f"{path} is empty: the run logged no step yet (train.log_every)")
  cfg_path = wd / "config.json"
  config = read_config(cfg_path) if cfg_path.is_file() else None
  return RunLog(name or wd.resolve().name, wd, rows, config, notes)


def series(rows: list[dict[str, float]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one metric, finite values only (the first step has no rate yet)."""
  pts = [(r["step"], float(r[key])) for r in rows
         if key in r and r[key] is not None and math.isfinite(float(r[key]))]
  if not pts:
    return np.zeros((0,)), np.zeros((0,))
  steps, vals = zip(*pts)
  return np.asarray(steps), np.asarray(vals)


def ema(values: np.ndarray, alpha: float) -> np.ndarray:
  """Exponential moving average (TensorBoard-style smoothing); alpha=0 leaves values as is."""
  if alpha <= 0 or len(values) == 0:
    return values
  out = np.empty_like(values)
  acc = values[0]
  for i, v in enumerate(values):
    acc = alpha * acc + (1 - alpha) * v
    out[i] = acc
  return out


def summarize(run: RunLog) -> dict[str, Any]:
  """The numbers a comparison table needs, per run."""
  s_loss, loss = series(run.rows, "loss")
  s_eval, ev = series(run.rows, "eval_loss")
  _, tps = series(run.rows, "tokens_per_sec")
  _, mfu = series(run.rows, "mfu")
  best = int(np.argmin(ev)) if len(ev) else None
  return {
      "run": run.name,
      "last step": int(run.rows[-1]["step"]),
      "final loss": float(loss[-1]) if len(loss) else float("nan"),
      "best eval loss": float(ev[best]) if best is not None else float("nan"),
      "at step": int(s_eval[best]) if best is not None else -1,
      "median tokens/s": float(np.median(tps)) if len(tps) else float("nan"),
      "median MFU %": float(np.median(mfu)) * 100 if len(mfu) else float("nan"),
  }


def flat_config(tree: dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  for k, v in (tree or {}).items():
    if isinstance(v, dict):
      out.update(flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff(runs: list[RunLog]) -> dict[str, list[Any]]:
  """Config keys whose values are not the same in every run (missing configs show as None)."""
  flats = [flat_config(r.config) for r in runs]
  keys = sorted(set().union(*flats))
  return {k: [f.get(k) for f in flats] for k in keys
          if len({json.dumps(f.get(k)) for f in flats}) > 1}


def make_figure(runs: list[RunLog], smooth: float = 0.0):
  """A 2x3 grid of panels, one line per run. A bare Figure renders with Agg and leaves
  pyplot's backend alone, so this works headless and inside notebooks."""
  import matplotlib
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  fig = Figure(figsize=(15, 8), layout="constrained")
  axes = fig.subplots(2, 3)
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, (key, title, scale, logy) in zip(axes.flat, PANELS):
    drawn = 0
    for i, run in enumerate(runs):
      steps, vals = series(run.rows, key)
      if not len(steps):
        continue
      color = colors[i % len(colors)]
      y = vals * scale
      if smooth > 0 and key in ("loss", "tokens_per_sec", "mfu", "grad_norm"):
        ax.plot(steps, y, color=color, alpha=0.25, linewidth=1)
        y = ema(y, smooth)
      marker = "o" if key == "eval_loss" or len(steps) < 30 else None
      ax.plot(steps, y, color=color, label=run.name, marker=marker, markersize=3)
      drawn += 1
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if logy and drawn:
      ax.set_yscale("log")
    if not drawn:
      ax.text(0.5, 0.5, f"no '{key}' logged", ha="center", va="center",
              transform=ax.transAxes, color="gray")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc="outside upper center", ncol=min(len(runs), 6))
  return fig


def plot_runs(runs: list[RunLog], path: Path, smooth: float = 0.0) -> Path:
  """The figure as a PNG file."""
  fig = make_figure(runs, smooth)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  return path


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return "nan" if v != v else f"{v:.4g}"
  return str(v)


def summary_text(summaries: list[dict[str, Any]]) -> str:
  cols = list(summaries[0])
  width = {c: max(len(c), *(len(_fmt(s[c])) for s in summaries)) for c in cols}
  lines = ["  ".join(c.ljust(width[c]) for c in cols)]
  lines += ["  ".join(_fmt(s[c]).ljust(width[c]) for c in cols) for s in summaries]
  return "\n".join(lines)


def write_html(runs: list[RunLog], png: Path, path: Path) -> Path:
  """One self-contained page: the plot (embedded), the summary and the config differences."""
  summaries = [summarize(r) for r in runs]
  cols = list(summaries[0])
  esc = lambda v: html.escape(_fmt(v))  # noqa: E731
  table = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
  table += "".join("<tr>" + "".join(f"<td>{esc(s[c])}</td>" for c in cols) + "</tr>"
                   for s in summaries)
  diff = config_diff(runs)
  if len(runs) > 1 and diff:
    head = "<tr><th>config key</th>" + "".join(f"<th>{html.escape(r.name)}</th>" for r in runs)
    rows = "".join("<tr><td>" + html.escape(k) + "</td>" +
                   "".join(f"<td>{esc(v)}</td>" for v in vals) + "</tr>"
                   for k, vals in diff.items())
    diff_html = f"<h2>Config differences</h2><table>{head}</tr>{rows}</table>"
  elif len(runs) > 1:
    diff_html = "<h2>Config differences</h2><p>none: the runs share one config</p>"
  else:
    diff_html = ""
  notes = [n for r in runs for n in r.notes]
  notes_html = ("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
                + "</ul>") if notes else ""
  dirs = "".join(f"<li>{html.escape(r.name)}: {html.escape(str(r.workdir.resolve()))}</li>"
                 for r in runs)
  img = base64.b64encode(png.read_bytes()).decode()
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lmos report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} img{{max-width:100%}}</style>
</head><body><h1>lmos report: {len(runs)} run{'s' if len(runs) > 1 else ''}</h1>
<ul>{dirs}</ul><img alt="training curves" src="data:image/png;base64,{img}">
<h2>Summary</h2><table>{table}</table>{diff_html}{notes_html}</body></html>
"""
  path.write_text(page)
  return path


def report(workdirs: list[str | Path], out_dir: str | Path, smooth: float = 0.0,
           labels: list[str] | None = None) -> tuple[Path, Path, str]:
  """Loads the runs and writes OUT/report.png and OUT/report.html; returns them + the table."""
  if labels and len(labels) != len(workdirs):
    raise ReportError(f"--labels has {len(labels)} names for {len(workdirs)} workdirs")
  if not 0.0 <= smooth < 1.0:
    raise ReportError(f"--smooth={smooth} must be in [0, 1)")
  runs = [load_run(w, labels[i] if labels else None) for i, w in enumerate(workdirs)]
  names = [r.name for r in runs]
  if len(set(names)) != len(names):  # same basename in different parents: use the paths
    for r in runs:
      r.name = str(r.workdir)
  out = Path(out_dir)
  png = plot_runs(runs, out / "report.png", smooth)
  page = write_html(runs, png, out / "report.html")
  return png, page, summary_text([summarize(r) for r in runs])


def main(argv: list[str]) -> int:
  parser = ArgumentParser(prog=argv[0], description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+", help="run directories from `lmos train`")
  parser.add_argument("--out", default=None,
                      help="output directory (default: WORKDIR/report for one run, "
                           "./lmos_report for several)")
  parser.add_argument("--smooth", type=number(float, 0, 1, high_open=True), default=0.0,
                      help="EMA smoothing in [0, 1) for noisy curves (raw curve stays faint)")
  parser.add_argument("--labels", default="", help="comma-separated run names for the legend")
  args = parser.parse_args(argv[1:])
  out = args.out or (str(Path(args.workdirs[0]) / "report") if len(args.workdirs) == 1
                     else "lmos_report")
  labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
  try:
    png, page, table = report(args.workdirs, out, args.smooth, labels)
  except ReportError as e:
    print(f"lmos report: {e}", file=sys.stderr)
    return 2
  print(table)
  print(f"wrote {png} and {page}")
  return 0
