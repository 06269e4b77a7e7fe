"""The rows `lmos predict --input` classifies: TSV/CSV (header row), JSONL, plain text, or
stdin streamed in groups. Every line becomes one `Row`, in order: its texts and gold label,
or the error that replaces its prediction, so a bad line never shifts the output's lines.
A bad file (missing, no text column, wrong field count) is a UserError before any model work.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from lmos_jax.errors import UserError

MAX_LINE_BYTES = 100_000  # a longer input line is an error record, not a (truncated) prediction
STDIN_WAIT_S = 0.05  # stdin: a batch goes out this long after its first line at the latest


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
