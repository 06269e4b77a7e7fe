"""Document sources: the embedded corpus, plain text files, local text/json/jsonl/parquet/csv
files and Hugging Face datasets, all read through `datasets.load_dataset` where a table is
involved so a hub name and a local file take the same code path.

Bad input fails with an error naming the field and the fix, or is repaired, counted in
`Repairs` and logged: nothing is dropped silently.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import logging
import os
from pathlib import Path
from typing import Any

from lmos_jax.config.datadir import missing_hint
from lmos_jax.config.loading import ConfigError
from lmos_jax.config.schema import CHOICES
from lmos_jax.data.errors import DataError, DataFileNotFoundError
from lmos_jax.data.text import embedded_corpus

log = logging.getLogger("lmos_jax.data")

KINDS = CHOICES["data.source"]
FORMATS = CHOICES["data.format"]
EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
              ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One source of documents (a `data` block, or one entry of `data.mixture`)."""

  kind: str = "embedded"
  path: str = ""
  format: str = ""
  text_field: str = "text"
  hf_name: str = ""
  hf_config: str = ""
  hf_split: str = "train"
  hf_val_split: str = ""
  val_path: str = ""
  weight: float = 1.0
  max_chars: int = 4_000_000
  name: str = "data"  # the config path used in messages ("data" or "data.mixture[i]")


class Repairs(collections.Counter):
  """Counts of repaired input (non-UTF-8 bytes, empty documents, split long documents)."""

  def note(self, what: str, n: int, where: str) -> None:
    if n:
      self[what] += n
      log.warning("data: %s: %d %s (repaired, counted in data repairs)", where, n, what)


def expand_files(pattern: str, field: str) -> list[str]:
  """Sorted files matching a path or glob (comma-separated allowed); errors name the field."""
  if not pattern:
    raise ConfigError(f"config '{field}' is empty; give a file path or glob")
  files: list[str] = []
  for part in [p.strip() for p in pattern.split(",") if p.strip()]:
    part = os.path.expanduser(part)
    matched = sorted(f for f in glob.glob(part, recursive=True) if os.path.isfile(f))
    if not matched:
      what = "glob matches no files" if glob.has_magic(part) else "no such file"
      raise DataFileNotFoundError(f"config '{field}'={part!r}: {what}; {missing_hint(field)}")
    files += matched
  return files


def read_bytes(path: str, field: str) -> bytes:
  """A data file's bytes; an unreadable file (permissions, a special file) names the field."""
  try:
    return Path(path).read_bytes()
  except OSError as e:
    raise DataError(f"config '{field}': cannot read {path} ({e.strerror or e}); check the "
                    "file and its permissions") from None


def decode_utf8(data: bytes, where: str, repairs: Repairs) -> str:
  """UTF-8 text; invalid bytes become U+FFFD and are counted (never silently)."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    text = data.decode("utf-8", errors="replace")
    good = data.decode("utf-8", errors="ignore")
    repairs.note("invalid UTF-8 bytes replaced by U+FFFD", len(data) - len(good.encode()),
                 where)
    return text


def infer_format(files: list[str], fmt: str, field: str) -> str:
  if fmt:
    return "json" if fmt == "jsonl" else fmt
  kinds = {EXTENSIONS.get(Path(f).suffix.lower()) for f in files}
  if None in kinds or len(kinds) != 1:
    raise ConfigError(f"config '{field}.format' is empty and the files' extensions "
                     f"{sorted({Path(f).suffix for f in files})} do not name one format; set "
                     f"{field}.format to one of {', '.join(FORMATS[1:])}")
  return kinds.pop()


def check_utf8_files(files: list[str], field: str, fmt: str, repairs: Repairs) -> bool:
  """True if some file has invalid UTF-8 (text/csv are then read with replacement, counted).

  JSON readers cannot repair bytes inside their syntax, so there it is an error naming the
  file and the byte offset.
  """
  if fmt == "parquet":
    return False
  bad = False
  for f in files:
    data = read_bytes(f, field)
    try:
      data.decode("utf-8")
    except UnicodeDecodeError as e:
      if fmt == "json":
        raise DataError(f"config '{field}': {f} is not valid UTF-8 (byte {e.start}); "
                        "re-encode the file as UTF-8") from None
      decode_utf8(data, f, repairs)
      bad = True
  return bad


@contextlib.contextmanager
def quiet_progress(datasets, quiet: bool):
  """No `datasets` progress bars while `quiet`: for local files the "Generating train split"
  bar is over at once and only adds lines to stderr beside lmos's own (a download from the
  hub keeps its bar). The previous setting is restored."""
  was_disabled = datasets.are_progress_bars_disabled()
  if quiet:
    datasets.disable_progress_bars()
  try:
    yield
  finally:
    if quiet and not was_disabled:
      datasets.enable_progress_bars()


def load_table(spec: SourceSpec, split: str, data_files: list[str] | None, fmt: str,
               replace_bad_utf8: bool):
  """`datasets.load_dataset` for a hub name/dir or a local builder (text/json/parquet/csv)."""
  import datasets
  kwargs: dict[str, Any] = {}
  if spec.kind == "hf":
    name = spec.hf_name
    if not name:
      raise ConfigError(f"config '{spec.name}.hf_name' is empty; give a dataset name, a local "
                        "dataset directory or a builder (json, parquet, csv, text)")
    if spec.hf_config:
      kwargs["name"] = spec.hf_config
  else:
    name = {"tsv": "csv"}.get(fmt, fmt)
    if fmt == "tsv":
      kwargs["delimiter"] = "\t"
    if fmt == "csv" and any(f.endswith(".tsv") for f in data_files or ()):
      kwargs["delimiter"] = "\t"
    if name == "text":
      kwargs["sample_by"] = "line"
    if replace_bad_utf8 and name in ("text", "csv"):
      kwargs["encoding_errors"] = "replace"
  if data_files:
    kwargs["data_files"] = data_files
  try:
    with quiet_progress(datasets, spec.kind == "files"):
      ds = datasets.load_dataset(name, split=split, **kwargs)
  except (OSError, ValueError) as e:  # not found, hub unreachable, unparsable file
    where = f"'{spec.name}.hf_name'={name!r}" if spec.kind == "hf" else f"'{spec.name}.path'"
    raise DataError(f"config {where}, split {split!r}: datasets could not load it ({e})"
                    ) from None
  return ds


def table_texts(ds, spec: SourceSpec, where: str) -> list[str]:
  """The text column as a list; missing field names the columns there are."""
  cols = list(ds.column_names or [])
  if spec.text_field not in cols:
    raise DataError(f"config '{spec.name}.text_field'={spec.text_field!r} is not a column of "
                    f"{where}; its columns are {cols}; set text_field to one of them")
  out = []
  for i, t in enumerate(ds[spec.text_field]):
    if t is None:
      t = ""
    elif not isinstance(t, str):
      raise DataError(f"config '{spec.name}.text_field'={spec.text_field!r}: row {i} of "
                      f"{where} is {type(t).__name__}, not text; choose a text column")
    out.append(t)
  return out


def drop_empty(docs: list[str], where: str, repairs: Repairs) -> list[str]:
  """Empty or whitespace-only documents carry no tokens: dropped, counted and logged (not
  when none is left: the caller then stops with one error saying so)."""
  kept = [d for d in docs if d.strip()]
  if kept:
    repairs.note("empty documents skipped", len(docs) - len(kept), where)
  return kept


def read_split(spec: SourceSpec, split: str, path: str, field: str, repairs: Repairs
               ) -> list[str]:
  """Documents of one split of a files/hf source."""
  files = expand_files(path, field) if path else None
  fmt = ""
  bad = False
  if spec.kind == "files":
    fmt = infer_format(files, spec.format, spec.name)
    bad = check_utf8_files(files, field, fmt, repairs)
  ds = load_table(spec, split, files, fmt, bad)
  where = f"{spec.hf_name or path} [{split}]"
  return table_texts(ds, spec, where)


def read_documents(spec: SourceSpec, repairs: Repairs) -> tuple[list[str], list[str] | None]:
  """(train documents, validation documents or None when the source has no own split)."""
  if spec.kind == "embedded":
    return [embedded_corpus(spec.max_chars)], None
  if spec.kind == "text":
    docs = [decode_utf8(read_bytes(f, f"{spec.name}.path"), f, repairs)
            for f in expand_files(spec.path, f"{spec.name}.path")]
    val = None
    if spec.val_path:
      val = [decode_utf8(read_bytes(f, f"{spec.name}.val_path"), f, repairs)
             for f in expand_files(spec.val_path, f"{spec.name}.val_path")]
  elif spec.kind in ("files", "hf"):
    if spec.kind == "files" and not spec.path:
      raise ConfigError(f"config '{spec.name}.path' is empty; give files (glob allowed) for "
                        f"{spec.name}.source=files")
    split = spec.hf_split if spec.kind == "hf" else "train"
    docs = read_split(spec, split, spec.path, f"{spec.name}.path", repairs)
    val = None
    if spec.kind == "hf" and spec.hf_val_split:
      val = read_split(spec, spec.hf_val_split, spec.path, f"{spec.name}.path", repairs)
    elif spec.val_path:
      val = read_split(spec, "train", spec.val_path, f"{spec.name}.val_path", repairs)
  else:
    raise ConfigError(f"config '{spec.name}.source'={spec.kind!r}: expected one of "
                      f"{', '.join(KINDS)}")
  where = spec.path or spec.hf_name or spec.kind
  docs = drop_empty(docs, where, repairs)
  if not docs:
    raise DataError(f"config '{spec.name}' ({where}) holds no non-empty documents; give "
                    "data with text in it (or check text_field)")
  if val is not None:
    val = drop_empty(val, f"{where} (validation)", repairs)
    if not val:
      raise DataError(f"the validation split of '{spec.name}' ({where}) holds no non-empty "
                      "documents; give a validation split with text or leave it unset")
  return docs, val


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
  """Tail documents for validation (deterministic); at least one of each when possible."""
  n_val = int(round(len(docs) * val_fraction))
  if val_fraction > 0 and len(docs) > 1:
    n_val = min(max(n_val, 1), len(docs) - 1)
  else:
    n_val = 0
  return docs[:len(docs) - n_val], docs[len(docs) - n_val:]
