"""`lmos predict` against transformers' text-classification pipeline on the same classifier.

The finetuned classifier of --workdir (`lmos train --config configs/bert_sst2.py:full,...`) is
exported with `lmos convert --to-hf OUT/hf --workdir W --force`, and both sides classify every
text of the same TSV (header row; a text column and an optional `label` column, e.g. SST-2's
dev.tsv):

  lmos  `lmos predict --workdir W --input FILE --output OUT/lmos_K.jsonl --batch-size B`, as
        users run it: texts encoded to the run's data.seq_len and packed several to a row
        of seq_len tokens, B/4 rows per batch (the tokens of about B texts).
  hf    transformers.pipeline("text-classification", model=OUT/hf, tokenizer=OUT/hf,
        device="cpu", top_k=None, truncation=True, max_length=data.seq_len,
        function_to_apply="softmax"), called once on the list of texts with batch_size=B
        (batches in input order, each padded to its own longest text), torch threads =
        os.cpu_count(); probabilities per text to OUT/hf_K.jsonl.

Each side runs in its own fresh subprocess, alternating lmos, hf, lmos, hf, ... for --repeats,
and the parent times each process from launch to exit (imports, model loading, reading the
input, prediction, writing and exit all included). The prediction loop's texts/s is each
side's own: lmos predict's `R lines/s` (its loop after the model is loaded, compiles
included), the hf worker's pipeline call alone (its first-call costs included).

Parity, per text, between the lmos records and the pipeline's: the share of identical labels
(100% except for exact ties; a disagreement is listed with lmos's margin between the two
labels), the max |p_lmos - p_hf| over all labels and texts (lmos writes its probabilities
rounded to 6 decimals, so 5e-7 is the floor), and the accuracy of both against the gold
labels when the file has them. The pipeline's label names (the export's id2label) are mapped
to lmos's label names by id; `lmos convert` writes the run's names, so they should be the same
strings, and the results say whether they are. Results go to OUT/bench_predict.json; each
process's output to OUT/{lmos,hf}_K.log.

Run: python3 experiments/bench_predict.py --workdir W --input FILE.tsv [--out DIR] \
       [--batch-size 64] [--repeats 2]
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the worker's own clock starts before its heavy imports

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from side_by_side import fail, lmos_command, machine, timed  # noqa: E402

TEXT_COLUMNS = ("sentence", "text", "content", "sentence1", "question", "review")  # lmos's
TIE = 1e-6  # lmos's probabilities carry 6 decimals: a closer top two is a tie
SUMMARY = re.compile(r"lmos predict: (\d+) lines \((\d+) errors\) in ([0-9.]+) s, "
                     r"([0-9.]+|inf) lines/s")


class BenchError(Exception):
  """Bad input to the benchmark: one line on stderr, exit 2."""


def read_tsv(path: Path) -> tuple[list[str | None], list[str | None]]:
  """(texts, gold labels) per data line of a TSV, as `lmos predict --input` reads it: a
  header row, fields split on tabs (quotes literal), CRLF or LF; a line that is blank, not
  UTF-8 or has a blank text is None (lmos writes an error record there)."""
  with path.open("rb") as f:
    try:
      header = [h.strip() for h in f.readline().rstrip(b"\n").rstrip(b"\r").decode("utf-8")
                .split("\t")]
    except UnicodeDecodeError:
      raise BenchError(f"--input {path}: the header row is not valid UTF-8") from None
    others = [h for h in header if h != "label"]
    text_col = next((c for c in TEXT_COLUMNS if c in others),
                    others[0] if len(others) == 1 else None)
    if not any(header) or text_col is None:
      raise BenchError(f"--input {path}: cannot tell the text column in header {header}; name "
                       f"it one of {', '.join(TEXT_COLUMNS)}")
    it, il = header.index(text_col), (header.index("label") if "label" in header else None)
    texts, gold = [], []
    for n, raw in enumerate(f, start=2):
      try:
        line = raw.rstrip(b"\n").rstrip(b"\r").decode("utf-8")
      except UnicodeDecodeError:
        line = ""
      fields = line.split("\t")
      if not line.strip() or not fields[it].strip():
        texts.append(None)
        gold.append(None)
        continue
      if len(fields) != len(header):
        raise BenchError(f"{path}:{n}: {len(fields)} fields but the header has {len(header)}")
      texts.append(fields[it])
      gold.append((fields[il].strip() or None) if il is not None else None)
  return texts, gold


def read_jsonl(path: Path) -> list[dict]:
  return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


# --------------------------------------------------------------------------- the hf worker

def hf_worker(args) -> int:
  """The pipeline over every text of --input; records to --hf-out, one RESULT line."""
  import torch
  import transformers

  torch.set_num_threads(os.cpu_count())
  texts, _ = read_tsv(Path(args.input))
  ok = [t for t in texts if t is not None]
  pipe = transformers.pipeline("text-classification", model=args.hf_dir, tokenizer=args.hf_dir,
                               device="cpu", top_k=None, truncation=True,
                               max_length=args.max_length, function_to_apply="softmax")
  setup_s = time.perf_counter() - T0
  t0 = time.perf_counter()
  results = pipe(ok, batch_size=args.batch_size)
  pipeline_s = time.perf_counter() - t0
  it = iter(results)
  with open(args.hf_out, "w", encoding="utf-8") as f:
    for t in texts:
      if t is None:
        f.write(json.dumps({"error": "blank or unreadable line"}) + "\n")
        continue
      scores = next(it)  # [{label, score}, ...] highest first (stable: lower id on a tie)
      f.write(json.dumps({"text": t, "label": scores[0]["label"],
                          "probs": {s["label"]: float(s["score"]) for s in scores}},
                         ensure_ascii=False) + "\n")
  print("RESULT " + json.dumps({
      "setup_s": setup_s, "loop_s": pipeline_s, "texts": len(ok),
      "texts_per_s": len(ok) / pipeline_s, "threads": torch.get_num_threads(),
      "dtype": str(pipe.model.dtype), "model_class": type(pipe.model).__name__}), flush=True)
  return 0


# ------------------------------------------------------------------------------ the parent


def classifier_workdir(workdir: Path) -> tuple[dict, list[str]]:
  """(config.json, label names) of a classifier workdir, read as plain JSON."""
  if not workdir.is_dir():
    raise BenchError(f"--workdir {workdir}: no such directory")
  path = workdir / "config.json"
  if not path.is_file():
    raise BenchError(f"--workdir {workdir}: no config.json; give the workdir of a finetuned "
                     "classifier (`lmos train --config configs/bert_sst2.py:full,...`)")
  try:
    cfg = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise BenchError(f"{path} is not valid JSON ({e})") from None
  if cfg.get("task") != "cls":
    raise BenchError(f"--workdir {workdir}: task={cfg.get('task')!r} is not a classifier "
                     "(task 'cls')")
  if (cfg.get("data") or {}).get("text_b"):
    raise BenchError(f"--workdir {workdir}: a sentence-pair classifier (data.text_b="
                     f"{cfg['data']['text_b']!r}); this benchmark feeds single texts only")
  if (workdir / "labels.json").is_file():
    labels = [str(n) for n in json.loads((workdir / "labels.json").read_text())]
  else:
    hf = workdir / "hf_config.json"
    id2label = (json.loads(hf.read_text()).get("id2label") or {}) if hf.is_file() else {}
    if not id2label:
      raise BenchError(f"--workdir {workdir}: no labels.json; give the workdir of a finetuned "
                       "classifier")
    labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
  return cfg, labels


def export(workdir: Path, hf_dir: Path, out: Path) -> dict | int:
  log = out / "convert.log"
  wall, rc = timed(lmos_command() + ["convert", "--to-hf", str(hf_dir), "--workdir",
                                     str(workdir), "--force"], log)
  if rc:
    return fail("bench_predict", "lmos convert --to-hf", log, rc)
  return {"wall_s": wall, **json.loads((hf_dir / "config.json").read_text())}


def run_lmos(k: int, args, workdir: Path, inp: Path, out: Path) -> dict | int:
  records = out / f"lmos_{k}.jsonl"
  log = out / f"lmos_{k}.log"
  cmd = lmos_command() + ["predict", "--workdir", str(workdir), "--input", str(inp),
                          "--output", str(records), "--force",
                          "--batch-size", str(args.batch_size)]
  wall, rc = timed(cmd, log)
  found = SUMMARY.findall(log.read_text(errors="replace"))
  if rc or not found:
    return fail("bench_predict", "lmos predict", log, rc)
  lines, errors, loop_s, rate = found[-1]
  return {"side": "lmos", "repeat": k, "wall_s": wall, "loop_s": float(loop_s),
          "texts": int(lines) - int(errors), "lines": int(lines), "errors": int(errors),
          "texts_per_s": float(rate), "records": str(records)}


def run_hf(k: int, args, hf_dir: Path, inp: Path, max_length: int, out: Path) -> dict | int:
  records = out / f"hf_{k}.jsonl"
  log = out / f"hf_{k}.log"
  cmd = [sys.executable, str(Path(__file__).resolve()), "--hf-worker", "--hf-dir", str(hf_dir),
         "--input", str(inp), "--hf-out", str(records), "--max-length", str(max_length),
         "--batch-size", str(args.batch_size)]
  wall, rc = timed(cmd, log)
  lines = [l for l in log.read_text(errors="replace").splitlines() if l.startswith("RESULT ")]
  if rc or not lines:
    return fail("bench_predict", "the transformers pipeline worker", log, rc)
  return {"side": "hf", "repeat": k, "wall_s": wall, **json.loads(lines[-1][len("RESULT "):]),
          "records": str(records)}


def parity(lmos_path: Path, hf_path: Path, labels: list[str], hf_to_lmos: dict[str, str],
           texts: list[str | None], gold: list[str | None]) -> dict:
  """Per-text agreement of one lmos run with one hf run (see the module docstring)."""
  a, b = read_jsonl(lmos_path), read_jsonl(hf_path)
  if not len(a) == len(b) == len(texts):
    raise BenchError(f"{lmos_path} has {len(a)} records, {hf_path} {len(b)}, the input "
                     f"{len(texts)} data lines")
  same, compared, max_diff, text_mismatch = 0, 0, 0.0, 0
  ties, disagree = 0, []
  right = {"lmos": 0, "hf": 0}
  labelled = 0
  for i, (ra, rb, t, g) in enumerate(zip(a, b, texts, gold)):
    if t is None or "error" in ra or "error" in rb:
      continue
    if ra["text"] != t or rb["text"] != t:
      text_mismatch += 1
      continue
    compared += 1
    pb = {hf_to_lmos[name]: p for name, p in rb["probs"].items()}
    label_b = hf_to_lmos[rb["label"]]
    max_diff = max(max_diff, max(abs(ra["probs"][n] - pb[n]) for n in labels))
    if ra["label"] == label_b:
      same += 1
    else:
      margin = ra["probs"][ra["label"]] - ra["probs"][label_b]
      ties += margin <= TIE
      disagree.append({"line": i + 2, "lmos": ra["label"], "hf": label_b,
                       "lmos_margin": margin, "text": t[:80]})
    if g is not None:
      labelled += 1
      right["lmos"] += ra["label"] == g
      right["hf"] += label_b == g
  return {"compared": compared, "identical_labels": same,
          "identical_share": same / compared if compared else 0.0,
          "disagreements": len(disagree), "disagreements_at_ties": ties,
          "disagreement_rows": disagree[:20], "max_abs_prob_diff": max_diff,
          "text_mismatches": text_mismatch, "labelled": labelled,
          "lmos_accuracy": right["lmos"] / labelled if labelled else None,
          "hf_accuracy": right["hf"] / labelled if labelled else None}


NAMES = {"lmos": "lmos predict", "hf": "transformers pipeline (lmos convert --to-hf)"}


def run_table(rows: list[dict]) -> str:
  out = ["| repeat | impl | wall s | prediction loop s | texts/s |", "|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['repeat']} | {NAMES[r['side']]} | {r['wall_s']:.1f} | {r['loop_s']:.2f} "
               f"| {r['texts_per_s']:.1f} |")
  return "\n".join(out)


def summarize(rows: list[dict]) -> dict:
  med = lambda side, key: statistics.median(r[key] for r in rows if r["side"] == side)  # noqa
  pairs = [(a, b) for a in rows for b in rows
           if a["side"] == "lmos" and b["side"] == "hf" and a["repeat"] == b["repeat"]]
  out = {side: {key: med(side, key) for key in ("wall_s", "loop_s", "texts_per_s")}
         for side in ("lmos", "hf")}
  out["speed_ratio_lmos_over_hf"] = statistics.median(a["texts_per_s"] / b["texts_per_s"]
                                                      for a, b in pairs)
  out["wall_ratio_lmos_over_hf"] = statistics.median(a["wall_s"] / b["wall_s"]
                                                     for a, b in pairs)
  return out


def summary_table(s: dict, repeats: int) -> str:
  out = [f"| impl (median of {repeats}) | wall s | prediction loop s | texts/s |",
         "|---|---|---|---|"]
  for side in ("lmos", "hf"):
    m = s[side]
    out.append(f"| {NAMES[side]} | {m['wall_s']:.1f} | {m['loop_s']:.2f} | "
               f"{m['texts_per_s']:.1f} |")
  out += ["", f"prediction texts/s, lmos / hf: {s['speed_ratio_lmos_over_hf']:.2f}x (median of "
          f"the per-repeat ratios; above 1 means lmos predicts faster); wall, lmos / hf: "
          f"{s['wall_ratio_lmos_over_hf']:.2f}x (below 1 means lmos finishes sooner)"]
  return "\n".join(out)


def parity_table(p: dict, same_names: bool) -> str:
  pct = lambda x: "-" if x is None else f"{100 * x:.2f}"  # noqa: E731
  out = ["| texts compared | identical labels | disagreements (at ties) | max abs prob diff | "
         "lmos accuracy | hf accuracy | label names identical |",
         "|---|---|---|---|---|---|---|",
         f"| {p['compared']} | {pct(p['identical_share'])}% | {p['disagreements']} "
         f"({p['disagreements_at_ties']}) | {p['max_abs_prob_diff']:.2e} | "
         f"{pct(p['lmos_accuracy'])} | {pct(p['hf_accuracy'])} | {'yes' if same_names else 'no'} |"]
  for d in p["disagreement_rows"]:
    out.append(f"  line {d['line']}: lmos {d['lmos']} (margin {d['lmos_margin']:.2e}), "
               f"hf {d['hf']}: {d['text']!r}")
  return "\n".join(out)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", help="workdir of a finetuned classifier (lmos train, task cls)")
  ap.add_argument("--input", help="TSV with a header row: a text column, optional 'label'")
  ap.add_argument("--out", default="runs/bench_predict")
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=2, help="lmos/hf pairs, alternating")
  ap.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)  # worker mode
  ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
  ap.add_argument("--hf-out", help=argparse.SUPPRESS)
  ap.add_argument("--max-length", type=int, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.repeats <= 0 or args.batch_size <= 0:
    ap.error("--repeats and --batch-size must be positive")
  if args.hf_worker:
    return hf_worker(args)
  if not args.workdir or not args.input:
    ap.error("--workdir and --input are required")

  try:
    workdir = Path(args.workdir).expanduser().resolve()
    cfg, labels = classifier_workdir(workdir)
    inp = Path(args.input).expanduser().resolve()
    if not inp.is_file():
      raise BenchError(f"--input {args.input}: no such file")
    if inp.suffix.lower() != ".tsv":
      raise BenchError(f"--input {args.input}: give a .tsv file (header row, text column, "
                       "optional label column)")
    texts, gold = read_tsv(inp)
    if not any(t is not None for t in texts):
      raise BenchError(f"--input {args.input}: no texts to classify")
    unknown = sorted({g for g in gold if g is not None} - set(labels))
    if unknown:
      raise BenchError(f"--input {args.input}: gold labels {unknown[:5]} are not among the "
                       f"model's labels {labels}")
  except BenchError as e:
    print(f"bench_predict: {e}", file=sys.stderr)
    return 2
  max_length = int((cfg.get("data") or {}).get("seq_len") or 0)
  if max_length <= 0:
    print(f"bench_predict: --workdir {workdir}: config.json has no data.seq_len",
          file=sys.stderr)
    return 2
  out = Path(args.out).expanduser().resolve()
  out.mkdir(parents=True, exist_ok=True)
  hf_dir = out / "hf"

  mach = machine()
  n_texts = sum(t is not None for t in texts)
  print(f"{mach['cpu']}, {mach['cores_available']} of {mach['cpu_count']} cores; torch "
        f"{mach['torch']}, transformers {mach['transformers']}, jax {mach['jax']}; "
        f"{n_texts} texts of {inp}, batch {args.batch_size}, max length {max_length}; "
        f"load {os.getloadavg()}", flush=True)
  exported = export(workdir, hf_dir, out)
  if isinstance(exported, int):
    return exported
  id2label = exported.get("id2label") or {}
  hf_names = [str(id2label[k]) for k in sorted(id2label, key=int)]
  if len(hf_names) != len(labels):
    print(f"bench_predict: {hf_dir}/config.json has {len(hf_names)} labels (id2label), the "
          f"workdir {len(labels)}", file=sys.stderr)
    return 1
  hf_to_lmos = dict(zip(hf_names, labels))
  same_names = hf_names == labels
  print(f"exported {workdir} -> {hf_dir} in {exported['wall_s']:.1f} s; id2label {hf_names}"
        + ("" if same_names else f" mapped by id to lmos's {labels}"), flush=True)

  rows = []
  for k in range(1, args.repeats + 1):
    for side in ("lmos", "hf"):
      r = (run_lmos(k, args, workdir, inp, out) if side == "lmos"
           else run_hf(k, args, hf_dir, inp, max_length, out))
      if isinstance(r, int):
        return r
      rows.append(r)
      print(f"[{k}/{args.repeats}] {side}: wall {r['wall_s']:.1f} s, prediction loop "
            f"{r['loop_s']:.2f} s, {r['texts_per_s']:.1f} texts/s"
            + (f"; {r['threads']} threads, {r['dtype']}" if side == "hf" else ""), flush=True)
    print("\n" + run_table([r for r in rows if r["repeat"] == k]) + "\n", flush=True)
  s = summarize(rows)
  print(summary_table(s, args.repeats))

  try:
    checks = [parity(out / f"lmos_{k}.jsonl", out / f"hf_{k}.jsonl", labels, hf_to_lmos, texts,
                     gold) for k in range(1, args.repeats + 1)]
  except (BenchError, KeyError) as e:
    print(f"bench_predict: the records do not line up: {e}", file=sys.stderr)
    return 1
  worst = max(checks, key=lambda p: (p["max_abs_prob_diff"], -p["identical_share"]))
  print(f"\nParity (the worst of {args.repeats} repeat{'s' * (args.repeats > 1)}):\n")
  print(parity_table(worst, same_names))
  ok = (worst["text_mismatches"] == 0
        and worst["disagreements"] == worst["disagreements_at_ties"])
  if not ok:
    print(f"\nbench_predict: PARITY FAILED: {worst['disagreements']} labels differ off ties, "
          f"{worst['text_mismatches']} texts differ", file=sys.stderr)
  print(f"\nload at end {os.getloadavg()}")
  result = {"machine": mach, "args": {k: v for k, v in vars(args).items()
                                      if k not in ("hf_worker", "hf_dir", "hf_out",
                                                   "max_length")},
            "workdir": str(workdir), "input": str(inp), "texts": n_texts,
            "max_length": max_length, "hf_dir": str(hf_dir), "convert_s": exported["wall_s"],
            "labels": labels, "hf_id2label": hf_names, "label_names_identical": same_names,
            "runs": rows, "summary": s, "parity": worst, "parity_per_repeat": checks,
            "parity_ok": ok}
  (out / "bench_predict.json").write_text(json.dumps(result, indent=2) + "\n")
  print(f"results: {out / 'bench_predict.json'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
