"""`lmos predict --workdir DIR "sentence" ...` (or `--input FILE`): label and probability from
a finetuned classifier.

Params come from the workdir: for a PEFT run, the base weights of `model.init_from` with
`adapters.safetensors` (adapters + head only) applied on top; otherwise the latest
checkpoint. Config, tokenizer and label names are the side files `lmos train` wrote, read
through lmos_jax.workdir (no training data is needed).

Batch mode, `lmos predict --workdir DIR --input FILE [--output OUT.jsonl] [--batch-size N]`,
classifies a TSV/CSV (header row), JSONL or plain-text file, or stdin (`-`, streamed), and
writes one JSON object per input line, in input order. Rows are batched like training's dev
set: encoded to `data.seq_len`, sorted by length within chunks, and each batch cut to the
narrowest `data.buckets` width that holds its longest row (the last batch is filled to the
batch size with copies of a row), so XLA sees a few fixed shapes. Bad lines become
`{"error": ...}` records at their position; a bad file is one line on stderr (exit 2) before
the model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmos_jax.errors import UserError
from lmos_jax.workdir import (ADAPTERS, label_names, model_layout, read_config, read_tokenizer,
                              workdir_params)

MAX_LINE_BYTES = 100_000  # a longer input line is an error record, not a (truncated) prediction
STDIN_WAIT_S = 0.05  # stdin: a batch goes out this long after its first line at the latest
CHUNK_BATCHES = 32  # files: rows are sorted by length within chunks of this many batches


def classifier_params(cfg, workdir: Path, abstract: dict) -> dict:
  """Full param tree: base + adapters for PEFT runs, else the latest params of the workdir."""
  from lmos_jax.train.init_from import init_from_params
  from lmos_jax.peft.wrap import load_adapters, overlay_params, split_by
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  adapters = Path(workdir) / ADAPTERS
  if cfg.peft.method != "full" and adapters.is_file():
    base, _ = init_from_params(cfg, abstract["embed"].shape[0])
    flat_base, _ = split_by(base, lambda _: True)
    params = overlay_params(zeros, flat_base, f"model.init_from={cfg.model.init_from}")
    flat, _ = load_adapters(str(adapters))
    return overlay_params(params, flat, str(adapters))
  flat, _ = split_by(workdir_params(workdir), lambda _: True)
  return overlay_params(zeros, flat, f"--workdir {workdir}")


def classifier_config(workdir: str | Path):
  """The workdir's config, checked to be a classifier's (reads config.json only)."""
  wd = Path(workdir)
  cfg = read_config(wd)
  if cfg.task != "cls":
    raise UserError(f"--workdir {wd}: task={cfg.task!r} is not a classifier (task 'cls')")
  return cfg


@dataclasses.dataclass
class Classifier:
  """A loaded classifier: `forward(batch) -> probs (B, C)` is the one jitted forward, on an
  encoded batch dict (inputs, token_type_ids, attention_mask; any width <= seq_len)."""

  cfg: Any
  tokenizer: Any
  labels: list[str]
  forward: Callable[[dict[str, np.ndarray]], np.ndarray]

  def encode(self, texts_a: Sequence[str], texts_b: Sequence[str] | None = None
             ) -> dict[str, np.ndarray]:
    from lmos_jax.data.encoder import encode_for_classifier
    return encode_for_classifier(self.tokenizer, texts_a, texts_b, self.cfg.data.seq_len)

  def predict(self, texts_a: Sequence[str], texts_b: Sequence[str] | None = None
              ) -> np.ndarray:
    """probs (N, C) of the sentences, one batch padded to seq_len."""
    return self.forward(self.encode(texts_a, texts_b))


def load_classifier(workdir: str | Path) -> Classifier:
  """The classifier of a workdir: config.json, tokenizer.json, labels.json and the latest
  params (base + adapters for PEFT runs)."""
  from flax import nnx

  wd = Path(workdir)
  cfg = classifier_config(wd)
  tok = read_tokenizer(wd)
  labels = label_names(wd)
  graphdef, abstract = model_layout(cfg, tok.vocab_size)
  if len(labels) != cfg.model.num_labels:
    raise UserError(f"--workdir {wd}: {len(labels)} label names for "
                    f"model.num_labels={cfg.model.num_labels}")
  try:
    params = jax.tree.map(jnp.asarray, classifier_params(cfg, wd, abstract))
  except ValueError as e:  # a tensor that does not fit the config's model
    raise UserError(str(e)) from None

  @jax.jit
  def probs(p, batch):
    logits = nnx.merge(graphdef, p)(batch["inputs"], token_type_ids=batch["token_type_ids"],
                                    attention_mask=batch["attention_mask"])
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  def forward(batch: dict[str, np.ndarray]) -> np.ndarray:
    keys = ("inputs", "token_type_ids", "attention_mask")
    return np.asarray(probs(params, {k: batch[k] for k in keys}))
  return Classifier(cfg, tok, labels, forward)


def build_classifier(workdir: str | Path):
  """(predict_fn(texts_a, texts_b) -> probs (N, C), label names, config), all read from the
  workdir: config.json, tokenizer.json, labels.json and the latest params."""
  clf = load_classifier(workdir)
  return clf.predict, clf.labels, clf.cfg


def batch_widths(cfg, spec: str | None = None) -> list[int]:
  """The widths batches are cut to: `spec`, else config 'data.buckets' ('auto' for workdirs
  written before it existed)."""
  from lmos_jax.data.encoder import bucket_widths
  if spec is None:
    spec = cfg.data.get("buckets", "auto")
  return bucket_widths(spec or "auto", cfg.data.seq_len)


def classify_rows(clf: Classifier, texts_a: Sequence[str], texts_b: Sequence[str] | None,
                  batch_size: int, widths: Sequence[int]) -> np.ndarray:
  """probs (N, C) in input order, batched like training's dev set: rows sorted by length,
  batches of `batch_size` (the last filled with copies of its first row, whose outputs are
  dropped) each cut to the narrowest of `widths` holding its longest row."""
  from lmos_jax.data.encoder import cut_to_width, fit_width, row_lengths
  n = len(texts_a)
  out = np.zeros((n, len(clf.labels)), np.float32)
  if n == 0:
    return out
  rows = clf.encode(texts_a, texts_b)
  lengths = row_lengths(rows)
  order = np.argsort(lengths, kind="stable")
  for lo in range(0, n, batch_size):
    idx = order[lo:lo + batch_size]
    full = np.concatenate([idx, np.full(batch_size - len(idx), idx[0], idx.dtype)])
    batch = cut_to_width({k: v[full] for k, v in rows.items()},
                         fit_width(int(lengths[idx].max()), widths))
    out[idx] = clf.forward(batch)[:len(idx)]
  return out


# ----------------------------------------------------------------- reading the input


@dataclasses.dataclass
class Row:
  """One input line: its texts and gold label, or the error that replaces its prediction."""

  line: int
  text_a: str = ""
  text_b: str | None = None
  gold: str | None = None
  error: str | None = None


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What the rows need from the model: its second-sentence column, and a --pair text."""

  text_b_column: str = ""
  pair: str | None = None


def _line_error(n: int, raw: bytes) -> tuple[str | None, str | None]:
  """(text, None) or (None, error) for one line's bytes (line break already removed)."""
  if len(raw) > MAX_LINE_BYTES:
    return None, (f"line {n}: {len(raw)} bytes, over the {MAX_LINE_BYTES}-byte limit per "
                  "line; shorten or split it")
  try:
    return raw.decode("utf-8"), None
  except UnicodeDecodeError as e:
    return None, f"line {n}: not valid UTF-8 (byte {e.start}); re-encode the input as UTF-8"


def _strip_eol(raw: bytes) -> bytes:
  raw = raw[:-1] if raw.endswith(b"\n") else raw
  return raw[:-1] if raw.endswith(b"\r") else raw


def _text_error(n: int, text: Any, what: str = "text") -> str | None:
  if not isinstance(text, str):
    return f"line {n}: the {what} is a {type(text).__name__}, expected a string"
  if not text.strip():
    return f"line {n}: empty {what}"
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return f"line {n}: the {what} is not valid Unicode (a lone surrogate)"
  return None


def plain_row(n: int, raw: bytes, spec: InputSpec) -> Row:
  """A plain-text line: the text; for a sentence-pair model without --pair,
  'first<TAB>second'."""
  text, err = _line_error(n, _strip_eol(raw))
  if err:
    return Row(n, error=err)
  b = spec.pair
  if spec.text_b_column and spec.pair is None:
    if "\t" not in text:
      return Row(n, error=f"line {n}: a sentence-pair model (data.text_b="
                          f"{spec.text_b_column!r}) needs 'first<TAB>second' on each line "
                          "(or --pair)")
    text, b = text.split("\t", 1)
  err = _text_error(n, text) or (_text_error(n, b, "second sentence") if b is not None
                                 else None)
  return Row(n, error=err) if err else Row(n, text, b)


def jsonl_row(n: int, raw: bytes, spec: InputSpec) -> Row:
  """A JSON object with a text field (the first of TEXT_COLUMNS present; `text`, `sentence`,
  ...), the model's second-sentence field for pairs, and an optional `label`."""
  from lmos_jax.data.encoder import TEXT_COLUMNS
  text, err = _line_error(n, _strip_eol(raw))
  if err:
    return Row(n, error=err)
  want = f"expected a JSON object with a text field ({', '.join(TEXT_COLUMNS)})"
  if not text.strip():
    return Row(n, error=f"line {n}: empty line; {want}")
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    return Row(n, error=f"line {n}: not valid JSON ({e.msg} at column {e.colno}); {want}")
  if not isinstance(obj, dict):
    return Row(n, error=f"line {n}: a JSON {type(obj).__name__}, {want}")
  key = next((c for c in TEXT_COLUMNS if c in obj and c != spec.text_b_column), None)
  if key is None:
    return Row(n, error=f"line {n}: no text field (keys {sorted(obj)[:8]}); {want}")
  b = spec.pair
  if b is None and spec.text_b_column:
    if spec.text_b_column not in obj:
      return Row(n, error=f"line {n}: no {spec.text_b_column!r} field, the second sentence "
                          f"of this sentence-pair model (data.text_b)")
    b = obj[spec.text_b_column]
  err = _text_error(n, obj[key]) or (_text_error(n, b, f"{spec.text_b_column or 'pair'} text")
                                     if b is not None else None)
  if err:
    return Row(n, error=err)
  gold = obj.get("label")
  gold = None if gold is None or str(gold).strip() == "" else str(gold).strip()
  return Row(n, obj[key], b, gold)


def _columns(header: list[str], spec: InputSpec, where: str) -> tuple[int, int | None,
                                                                      int | None]:
  """(text, label or None, second sentence or None) column indices of a header row."""
  from lmos_jax.data.encoder import TEXT_COLUMNS
  others = [h for h in header if h != "label" and h != spec.text_b_column]
  text_col = next((c for c in TEXT_COLUMNS if c in others),
                  others[0] if len(others) == 1 else None)
  if text_col is None:
    raise UserError(f"{where}: cannot tell the text column in header {header}; name it one "
                    f"of {', '.join(TEXT_COLUMNS)}")
  ib = None
  if spec.text_b_column and spec.pair is None:
    if spec.text_b_column not in header:
      raise UserError(f"{where}: this sentence-pair model reads its second sentence from "
                      f"column {spec.text_b_column!r} (config data.text_b), which header "
                      f"{header} lacks; add it (or give --pair)")
    ib = header.index(spec.text_b_column)
  il = header.index("label") if "label" in header else None
  return header.index(text_col), il, ib


def _table_row(n: int, fields: list[str], cols: tuple, spec: InputSpec) -> Row:
  ia, il, ib = cols
  b = fields[ib] if ib is not None else spec.pair
  err = _text_error(n, fields[ia]) or (_text_error(n, b, "second sentence") if b is not None
                                       else None)
  if err:
    return Row(n, error=err)
  gold = fields[il].strip() if il is not None else ""
  return Row(n, fields[ia], b, gold or None)


def read_tsv_rows(path: Path, spec: InputSpec) -> list[Row]:
  """Tab-separated, header row, quotes literal (as `lmos train` reads its TSVs)."""
  where = f"--input {path}"
  with path.open("rb") as f:
    head = f.readline()
    try:
      header = [h.strip() for h in _strip_eol(head).decode("utf-8").split("\t")]
    except UnicodeDecodeError:
      raise UserError(f"{where}: the header row is not valid UTF-8; re-encode the file"
                      ) from None
    if not head.strip():
      raise UserError(f"{where}: no header row; the first line must name the columns, e.g. "
                      "sentence<TAB>label")
    cols = _columns(header, spec, where)
    rows = []
    for n, raw in enumerate(f, start=2):
      text, err = _line_error(n, _strip_eol(raw))
      if err or not text.strip():
        rows.append(Row(n, error=err or f"line {n}: empty text"))
        continue
      fields = text.split("\t")
      if len(fields) != len(header):
        raise UserError(f"{path}:{n}: {len(fields)} fields but the header has {len(header)}; "
                        "fix the row (fields are separated by tabs)")
      rows.append(_table_row(n, fields, cols, spec))
  return rows


def read_csv_rows(path: Path, spec: InputSpec) -> list[Row]:
  """Comma-separated with CSV quoting, header row. Lines are decoded one by one, so an
  invalid UTF-8 byte makes only its row an error."""
  import csv
  where = f"--input {path}"
  csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # the byte limit is ours
  with path.open("rb") as f:
    lines = (raw.decode("utf-8", "surrogateescape") for raw in f)
    reader = csv.reader(lines)
    try:
      header = [h.strip() for h in next(reader, [])]
      if not any(header):
        raise UserError(f"{where}: no header row; the first line must name the columns, "
                        "e.g. sentence,label")
      if any(_has_bad_bytes(h) for h in header):
        raise UserError(f"{where}: the header row is not valid UTF-8; re-encode the file")
      cols = _columns(header, spec, where)
      rows = []
      for fields in reader:
        n = reader.line_num
        size = sum(len(x.encode("utf-8", "surrogateescape")) for x in fields)
        size += max(len(fields) - 1, 0)
        if size > MAX_LINE_BYTES:
          rows.append(Row(n, error=f"line {n}: {size} bytes, over the {MAX_LINE_BYTES}-byte "
                                   "limit per line; shorten or split it"))
        elif any(_has_bad_bytes(x) for x in fields):
          rows.append(Row(n, error=f"line {n}: not valid UTF-8; re-encode the input as UTF-8"))
        elif not fields or all(not x.strip() for x in fields):
          rows.append(Row(n, error=f"line {n}: empty text"))
        elif len(fields) != len(header):
          raise UserError(f"{path}:{n}: {len(fields)} fields but the header has "
                          f"{len(header)}; fix the row (quote fields that contain commas)")
        else:
          rows.append(_table_row(n, fields, cols, spec))
    except csv.Error as e:
      raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
  return rows


def _has_bad_bytes(text: str) -> bool:
  """Whether a surrogateescape-decoded string carried bytes that are not UTF-8."""
  return any("\udc80" <= ch <= "\udcff" for ch in text)


def read_rows(path: Path, spec: InputSpec) -> list[Row]:
  """Every row of an input file, by extension: .tsv, .csv, .jsonl/.json (JSON lines), else
  plain text (one text per line)."""
  if not path.is_file():
    raise UserError(f"--input {path}: no such file; give a .tsv, .csv, .jsonl or text file, "
                    "or - for stdin")
  suffix = path.suffix.lower()
  try:
    if suffix == ".tsv":
      return read_tsv_rows(path, spec)
    if suffix == ".csv":
      return read_csv_rows(path, spec)
    parse = jsonl_row if suffix in (".jsonl", ".json") else plain_row
    with path.open("rb") as f:
      return [parse(n, raw, spec) for n, raw in enumerate(f, start=1)]
  except OSError as e:
    raise UserError(f"--input {path}: cannot read it ({e.strerror or e})") from None


def check_gold(rows: Iterable[Row], labels: Sequence[str], where: str) -> None:
  """Every gold label is one of the model's label names."""
  known = set(labels)
  for r in rows:
    if r.error is None and r.gold is not None and r.gold not in known:
      raise UserError(f"{where}: line {r.line} has gold label {r.gold!r}, which is not one of "
                      f"the model's labels {list(labels)}; fix the label column")


def stdin_groups(stream, batch_size: int, spec: InputSpec,
                 wait: float = STDIN_WAIT_S) -> Iterator[list[Row]]:
  """Rows of a plain-text stream in groups of at most `batch_size`: a group goes out as soon
  as it is full, or `wait` seconds after its first line arrived when no more lines are
  waiting. A reader thread feeds a queue, so a slow producer never stalls a ready batch."""
  q: queue.Queue = queue.Queue(maxsize=max(4 * batch_size, 256))

  def reader():
    try:
      for raw in iter(stream.readline, b""):
        q.put((time.monotonic(), raw))
    finally:
      q.put(None)

  threading.Thread(target=reader, name="lmos-predict-stdin", daemon=True).start()
  n, done = 0, False
  while not done:
    item = q.get()
    if item is None:
      break
    deadline = item[0] + wait
    group = [item[1]]
    while len(group) < batch_size:
      try:
        item = q.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        break
      if item is None:
        done = True
        break
      group.append(item[1])
    rows = [plain_row(n + i + 1, raw, spec) for i, raw in enumerate(group)]
    n += len(group)
    yield rows


# ----------------------------------------------------------------- writing the output


def _record(row: Row, p: np.ndarray | None, labels: Sequence[str]) -> dict:
  if row.error is not None:
    return {"error": row.error}
  k = int(np.argmax(p))
  rec: dict[str, Any] = {"text": row.text_a}
  if row.text_b is not None:
    rec["text_b"] = row.text_b
  rec.update(label=labels[k], score=round(float(p[k]), 6),
             probs={name: round(float(x), 6) for name, x in zip(labels, p)})
  if row.gold is not None:
    rec["gold"] = row.gold
  return rec


def macro_f1(gold: np.ndarray, pred: np.ndarray, num_labels: int) -> float:
  """Mean over all `num_labels` labels of per-label F1 = 2tp / (2tp + fp + fn) (0 for a label
  neither in gold nor predicted)."""
  f1 = []
  for c in range(num_labels):
    tp = np.sum((pred == c) & (gold == c))
    fp = np.sum((pred == c) & (gold != c))
    fn = np.sum((pred != c) & (gold == c))
    f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
  return float(np.mean(f1))


@dataclasses.dataclass
class Tally:
  lines: int = 0
  errors: int = 0
  unlabelled: int = 0
  gold: list = dataclasses.field(default_factory=list)
  pred: list = dataclasses.field(default_factory=list)

  def summary(self, seconds: float, num_labels: int) -> str:
    rate = self.lines / seconds if seconds > 0 else float("inf")
    line = (f"lmos predict: {self.lines} lines ({self.errors} errors) in {seconds:.2f} s, "
            f"{rate:.1f} lines/s")
    if self.gold and not self.unlabelled:
      g, p = np.asarray(self.gold), np.asarray(self.pred)
      line += (f"; accuracy {np.mean(g == p):.4f}, macro-F1 {macro_f1(g, p, num_labels):.4f} "
               f"over {len(g)} labelled lines")
    return line


def run_batches(clf: Classifier, groups: Iterable[list[Row]], write: Callable[[dict], None],
                flush: Callable[[], None], batch_size: int, widths: Sequence[int]) -> Tally:
  """Classifies each group of rows (its error rows skipped), writes one record per row in
  order and flushes after every group."""
  tally = Tally()
  index = {name: i for i, name in enumerate(clf.labels)}
  for group in groups:
    ok = [r for r in group if r.error is None]
    b = [r.text_b for r in ok] if ok and ok[0].text_b is not None else None
    probs = classify_rows(clf, [r.text_a for r in ok], b, batch_size, widths)
    it = iter(probs)
    for r in group:
      p = next(it) if r.error is None else None
      write(_record(r, p, clf.labels))
      tally.lines += 1
      if r.error is not None:
        tally.errors += 1
      elif r.gold is None:
        tally.unlabelled += 1
      else:
        tally.gold.append(index[r.gold])
        tally.pred.append(int(np.argmax(p)))
    flush()
  return tally


def chunks(rows: list[Row], size: int) -> Iterator[list[Row]]:
  for lo in range(0, len(rows), size):
    yield rows[lo:lo + size]


def predict_input(args) -> int:
  """`--input`: read (files: all of it, checked) before loading the model, then classify."""
  wd = Path(args.workdir)
  cfg = classifier_config(wd)
  labels = label_names(wd)
  widths = batch_widths(cfg, args.buckets)
  spec = InputSpec(str(cfg.data.get("text_b", "") or ""), args.pair)
  out_path = None if args.output in (None, "-") else Path(args.output)
  if out_path is not None and not out_path.parent.is_dir():
    raise UserError(f"--output {args.output}: directory {out_path.parent} does not exist")
  if args.input == "-":
    groups = stdin_groups(sys.stdin.buffer, args.batch_size, spec)
  else:
    rows = read_rows(Path(args.input), spec)
    check_gold(rows, labels, f"--input {args.input}")
    groups = chunks(rows, args.batch_size * CHUNK_BATCHES)
  if out_path is None:
    out = sys.stdout
    ascii_only = "utf" not in (getattr(out, "encoding", None) or "utf-8").lower()
  else:
    try:
      out = out_path.open("w", encoding="utf-8")
    except OSError as e:
      raise UserError(f"--output {args.output}: cannot write it ({e.strerror or e})") from None
    ascii_only = False
  try:
    clf = load_classifier(wd)
    start = time.perf_counter()
    tally = run_batches(clf, groups,
                        lambda rec: out.write(json.dumps(rec, ensure_ascii=ascii_only) + "\n"),
                        out.flush, args.batch_size, widths)
  except BrokenPipeError:  # stdout closed early (`| head`): not an error of ours
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit flush
    return 0
  finally:
    if out_path is not None:
      out.close()
  print(tally.summary(time.perf_counter() - start, len(clf.labels)), file=sys.stderr,
        flush=True)
  return 0


def main(argv: list[str]) -> int:
  from lmos_jax.errors import ArgumentParser, existing_dir, number
  ap = ArgumentParser(prog=argv[0], description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, type=existing_dir("config.json"),
                  help="workdir of a finetuned classifier")
  ap.add_argument("--pair", default=None,
                  help="second sentence for sentence-pair tasks (applied to every sentence)")
  ap.add_argument("--input", default=None,
                  help="classify a file instead: .tsv/.csv (header row; text column and "
                       "optional label column), .jsonl (objects with a text field), any other "
                       "extension one text per line; - reads stdin line by line (streamed)")
  ap.add_argument("--output", default=None,
                  help="with --input: write the JSON lines here (default or -: stdout)")
  ap.add_argument("--batch-size", type=number(int, 1), default=64,
                  help="with --input: rows per batch (default 64)")
  ap.add_argument("--buckets", default=None,
                  help="with --input: batch widths, auto | off | 16,32,64 (default: the "
                       "run's data.buckets)")
  ap.add_argument("sentences", nargs="*", help="sentences to classify")
  args = ap.parse_args(argv[1:])
  try:
    if args.input is not None:
      if args.sentences:
        raise UserError("give sentences or --input FILE, not both")
      return predict_input(args)
    if not args.sentences:
      raise UserError("no sentences to classify: give them as arguments, or --input FILE "
                      f"(- for stdin); see `{argv[0]} --help`")
    for flag in ("output", "buckets"):
      if getattr(args, flag) is not None:
        raise UserError(f"--{flag} applies only with --input FILE")
    predict, labels, _ = build_classifier(args.workdir)
  except UserError as e:
    message = re.sub(r"\s*\n\s*", " ", str(e).strip())
    print(f"lmos predict: {message}", file=sys.stderr, flush=True)
    return 2
  pairs = [args.pair] * len(args.sentences) if args.pair is not None else None
  p = predict(args.sentences, pairs)
  for s, row in zip(args.sentences, p):
    k = int(np.argmax(row))
    print(f"{labels[k]}\t{row[k]:.4f}\t{s}", flush=True)
  return 0
