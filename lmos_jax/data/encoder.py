"""Encoder (BERT) batching: MLM masking, and sequence classification from TSV files.

MLM masking (BERT's recipe) lives here so pretraining and any finetuning pipeline share it:
`mlm_mask` masks one batch; `MLMData` wraps any LM data object (train_batch/val_batches)
and turns its token windows into masked-LM batches, a pure function of (seed, step).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lmos_jax.config.loading import ConfigError
from lmos_jax.data.stream import check_state
from lmos_jax.data.tokenizer import load_pretrained
from lmos_jax.config.datadir import missing_hint
from lmos_jax.data.errors import DataError, DataFileNotFoundError


def mlm_mask(ids_BT: np.ndarray, rng: np.random.Generator, *, mask_id: int,
             vocab_size: int, prob: float = 0.15, special_ids: Sequence[int] = (),
             attention_mask_BT: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """BERT masking: pick `prob` of the real (non-special, non-padding) tokens; of those 80%
  become [MASK], 10% a uniformly random id in [0, vocab_size), 10% stay. Returns inputs,
  targets (the original ids) and weights (1 at picked positions: the only ones scored)."""
  if not 0.0 < prob < 1.0:
    raise ConfigError(f"MLM mask probability {prob} must be in (0, 1) (config 'data.mlm_prob')")
  ids_BT = np.asarray(ids_BT)
  eligible = ~np.isin(ids_BT, np.asarray(list(special_ids), ids_BT.dtype))
  if attention_mask_BT is not None:
    eligible &= np.asarray(attention_mask_BT) > 0
  picked = (rng.random(ids_BT.shape) < prob) & eligible
  roll = rng.random(ids_BT.shape)
  to_mask = picked & (roll < 0.8)
  to_random = picked & (roll >= 0.8) & (roll < 0.9)
  inputs = np.where(to_mask, mask_id, ids_BT)
  inputs = np.where(to_random, rng.integers(0, vocab_size, ids_BT.shape), inputs)
  return {"inputs": inputs.astype(np.int32), "targets": ids_BT.astype(np.int32),
          "weights": picked.astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class MaskedTokenizer:
  """A tokenizer with a [MASK] id appended after its vocabulary (for tokenizers without one,
  e.g. byte/char); everything else is delegated."""

  base: Any

  @property
  def mask_id(self) -> int:
    return self.base.vocab_size

  @property
  def vocab_size(self) -> int:
    return self.base.vocab_size + 1

  @property
  def specials(self) -> dict[str, int]:
    return {**getattr(self.base, "specials", {}), "mask": self.mask_id}

  def encode(self, text: str) -> np.ndarray:
    return self.base.encode(text)

  def decode(self, ids) -> str:
    return self.base.decode([i for i in ids if int(i) != self.mask_id])

  def __getattr__(self, name: str):
    return getattr(self.base, name)


def with_mask_token(tokenizer) -> tuple[Any, int]:
  """(tokenizer, mask id): its own [MASK] if it has one, else one appended."""
  specials = getattr(tokenizer, "specials", {}) or {}
  if "mask" in specials:
    return tokenizer, int(specials["mask"])
  wrapped = MaskedTokenizer(tokenizer)
  return wrapped, wrapped.mask_id


@dataclasses.dataclass
class MLMData:
  """Masked-LM batches from the token windows (`inputs`) of any LM data object."""

  base: Any
  prob: float
  seed: int

  def __post_init__(self):
    self.tokenizer, self.mask_id = with_mask_token(self.base.tokenizer)
    specials = getattr(self.base.tokenizer, "specials", {}) or {}
    self.special_ids = tuple(sorted(set(int(i) for i in specials.values()) | {self.mask_id}))
    self.random_vocab = int(self.base.tokenizer.vocab_size)
    self.cls_id = specials.get("cls")

  def _mask(self, batch: dict[str, np.ndarray], key: Sequence[int]) -> dict[str, np.ndarray]:
    ids_BT = batch["inputs"]
    if self.cls_id is not None:  # BERT's framing: every row starts with [CLS], the token a
      ids_BT = ids_BT.copy()  # classifier finetune pools, so its embedding is pretrained too
      ids_BT[:, 0] = self.cls_id
    rng = np.random.default_rng(list(key))
    return mlm_mask(ids_BT, rng, mask_id=self.mask_id, vocab_size=self.random_vocab,
                    prob=self.prob, special_ids=self.special_ids)

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    # Keyed by (seed, step, process slice): the base already returns this host's rows.
    return self._mask(self.base.train_batch(step), (self.seed, 0, step))

  def val_batches(self) -> list[dict[str, np.ndarray]]:
    return [self._mask(b, (self.seed, 1, i)) for i, b in enumerate(self.base.val_batches())]

  def __getattr__(self, name: str):
    # state()/restore()/fingerprint... of the base stream
    if name in ("base", "__setstate__") or name.startswith("__"):
      raise AttributeError(name)
    return getattr(self.base, name)


# ----------------------------------------------------------------- sequence classification

TEXT_COLUMNS = ("sentence", "text", "content", "sentence1", "question", "review")


@dataclasses.dataclass(frozen=True)
class LabeledTexts:
  """Rows of a classification file: first (and optional second) sentences and raw labels."""

  text_a: list[str]
  text_b: list[str] | None
  labels: list[str]
  path: str


def read_tsv(path: str, text_b_column: str = "", limit: int = 0,
             field: str = "data.train") -> LabeledTexts:
  """A TSV with a header row naming a `label` column and a text column (SST-2/GLUE style).

  The text column is the first of TEXT_COLUMNS present, or the only non-label column;
  `text_b_column` names a second-sentence column for pairs. Quotes are literal text. Every
  problem with the file is a DataError naming `field` (the config field that gave the path).
  """
  import csv
  import io
  p = Path(path)
  where = f"config '{field}'={str(path)!r}"
  if not p.is_file():
    raise DataFileNotFoundError(f"config '{field}'={path!r}: no such file; "
                                f"{missing_hint(field)}")
  try:
    text = p.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{where}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8"
                    ) from None
  except OSError as e:
    raise DataError(f"{where}: cannot read it ({e.strerror or e})") from None
  reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
  header = [h.strip() for h in next(reader, [])]
  if "label" not in header:
    raise DataError(f"{where}: the header {header} has no 'label' column; the first row "
                    "must name the columns, e.g. sentence<TAB>label")
  others = [h for h in header if h != "label" and h != text_b_column]
  text_col = next((c for c in TEXT_COLUMNS if c in others), others[0] if len(others) == 1
                  else None)
  if text_col is None:
    raise DataError(f"{where}: cannot tell the text column in header {header}; name it "
                    f"one of {', '.join(TEXT_COLUMNS)}")
  if text_b_column and text_b_column not in header:
    raise DataError(f"config 'data.text_b'={text_b_column!r} is not a column of {path} "
                    f"(header {header}); set data.text_b to one of them or leave it empty")
  ia, il = header.index(text_col), header.index("label")
  ib = header.index(text_b_column) if text_b_column else None
  a, b, labels = [], [] if ib is not None else None, []
  for n, row in enumerate(reader, start=2):
    if not row or all(not c.strip() for c in row):
      continue
    if len(row) != len(header):
      raise DataError(f"{path}:{n}: {len(row)} fields but the header has {len(header)} "
                      f"(config '{field}'); fix the row (fields are separated by tabs)")
    a.append(row[ia])
    labels.append(row[il].strip())
    if ib is not None:
      b.append(row[ib])
    if limit and len(a) >= limit:
      break
  if not a:
    raise DataError(f"{where}: no data rows after the header; give a file with examples")
  return LabeledTexts(a, b, labels, str(path))


def label_ids(labels: Sequence[str], label_set: Sequence[str], where: str) -> np.ndarray:
  """Indices into `label_set`; a label outside it is an error naming the row and the set."""
  index = {l: i for i, l in enumerate(label_set)}
  out = np.empty(len(labels), np.int32)
  for n, l in enumerate(labels):
    if l not in index:
      raise DataError(f"{where}: row {n + 1} has label {l!r}, which is not in the label set "
                       f"{list(label_set)}; fix the row or set config 'data.labels'")
    out[n] = index[l]
  return out


def longest_first(n_a: int, n_b: int, budget: int) -> tuple[int, int]:
  """Lengths (a, b) a too-long pair is cut to: the rule of Hugging Face `tokenizers`
  (TruncationStrategy.LongestFirst), so a BERT tokenizer called with truncation=True cuts
  exactly where lmos does. The shorter keeps its length if the longer can absorb the cut;
  else both get half the budget, the one that was longer the extra odd token."""
  if n_a + n_b <= budget:
    return n_a, n_b
  swap = n_a > n_b
  short, long_ = (n_b, n_a) if swap else (n_a, n_b)
  long_ = short if short > budget else max(short, budget - short)
  if short + long_ > budget:
    short = budget // 2
    long_ = short + budget % 2
  return (long_, short) if swap else (short, long_)


def encode_for_classifier(tok, text_a: Sequence[str], text_b: Sequence[str] | None,
                          seq_len: int) -> dict[str, np.ndarray]:
  """[CLS] a [SEP] (b [SEP]) padded to seq_len: inputs, token_type_ids, attention_mask.

  Too-long inputs are cut from the end, longest-first (`longest_first`), keeping the
  special tokens.
  """
  sp = getattr(tok, "specials", {}) or {}
  missing = [r for r in ("cls", "sep", "pad") if r not in sp]
  if missing:
    raise DataError(f"the tokenizer has no {missing} tokens; classification needs a BERT "
                    "tokenizer (config 'data.tokenizer'='pretrained' with tokenizer_path)")
  cls, sep, pad = sp["cls"], sp["sep"], sp["pad"]
  ids_a = tok.encode_batch(list(text_a))
  ids_b = tok.encode_batch(list(text_b)) if text_b is not None else None
  n = len(ids_a)
  inputs = np.full((n, seq_len), pad, np.int32)
  types = np.zeros((n, seq_len), np.int32)
  mask = np.zeros((n, seq_len), np.int32)
  for i in range(n):
    a = list(ids_a[i])
    b = list(ids_b[i]) if ids_b is not None else []
    n_a, n_b = longest_first(len(a), len(b), seq_len - (3 if ids_b is not None else 2))
    a, b = a[:n_a], b[:n_b]
    row = [cls, *a, sep] + ([*b, sep] if ids_b is not None else [])
    inputs[i, :len(row)] = row
    types[i, len(a) + 2:len(row)] = 1
    mask[i, :len(row)] = 1
  return {"inputs": inputs, "token_type_ids": types, "attention_mask": mask}


def classifier_rows(tok, texts: LabeledTexts, label_set: Sequence[str], seq_len: int
                    ) -> dict[str, np.ndarray]:
  rows = encode_for_classifier(tok, texts.text_a, texts.text_b, seq_len)
  rows["labels"] = label_ids(texts.labels, label_set, texts.path)
  rows["weights"] = np.ones(len(texts.labels), np.float32)
  return rows


# ------------------------------------------------------------------ length buckets
# Rows are stored padded to seq_len; a batch is cut to the narrowest bucket width that holds
# its longest row. Every cut column is padding (attention_mask 0: never attended to, never
# pooled), so a cut batch computes what the padded one does, on a few fixed shapes (one
# compiled program per width) instead of seq_len for every sentence.


def bucket_widths(spec: str, seq_len: int) -> list[int]:
  """The padded widths batches may take, ascending, always ending at seq_len.

  spec: 'auto' (16, 24, 32, 48, 64, 96, ...: steps of at most 50%, so a batch carries at most
  ~1/3 padding beyond its longest row, with one compile per width), 'off' (seq_len only), or
  comma-separated widths such as '16,32,64'.
  """
  spec = str(spec).strip().lower()
  if spec == "off":
    return [seq_len]
  if spec == "auto":
    widths, w = [], 16
    while w < seq_len:
      widths.append(w)
      w = w + w // 2 if (w & (w - 1)) == 0 else w // 3 * 4  # 16, 24, 32, 48, 64, 96, ...
    return widths + [seq_len]
  try:
    widths = sorted({int(x) for x in spec.split(",") if x.strip()})
  except ValueError:
    widths = []
  if not widths or widths[0] <= 0:
    raise ConfigError(f"config 'data.buckets'={spec!r}: expected auto, off or comma-separated "
                      "positive widths such as 16,32,64")
  return [w for w in widths if w < seq_len] + [seq_len]


def fit_width(longest: int, widths: Sequence[int]) -> int:
  """The narrowest width holding a row of `longest` tokens (widths ascending)."""
  return next((w for w in widths if w >= longest), widths[-1])


def row_lengths(rows: dict[str, np.ndarray]) -> np.ndarray:
  """Tokens per row (special tokens included): the attention mask's count."""
  return rows["attention_mask"].sum(axis=1).astype(np.int32)


def cut_to_width(batch: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
  """The batch with its token columns cut to `width` (per-row arrays kept)."""
  return {k: v[:, :width] if v.ndim == 2 else v for k, v in batch.items()}


def sorted_windows(order: np.ndarray, lengths: np.ndarray, batch_size: int, window: int,
                   rng: np.random.Generator) -> np.ndarray:
  """`order` with each run of window*batch_size rows sorted by length and its batches shuffled.

  Rows of similar length land in the same batch (little padding), while which batch comes
  when stays random, so training sees no short-to-long curriculum within a window.
  """
  if window <= 1:
    return order
  out = order.copy()
  span = window * batch_size
  for lo in range(0, len(order), span):
    chunk = order[lo:lo + span]
    chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
    blocks = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    out[lo:lo + len(chunk)] = np.concatenate([blocks[i] for i in rng.permutation(len(blocks))])
  return out


def local_rows(batch: dict[str, np.ndarray], process_index: int, process_count: int
               ) -> dict[str, np.ndarray]:
  """This process's equal share of a global batch's rows."""
  per = len(next(iter(batch.values()))) // process_count
  lo = process_index * per
  return {k: v[lo:lo + per] for k, v in batch.items()}


def cut_to_fit(batch: dict[str, np.ndarray], lengths: np.ndarray, widths: Sequence[int]
               ) -> dict[str, np.ndarray]:
  """The global batch cut to the narrowest of `widths` holding its longest row (unchanged
  for no widths); every process cuts to the same width, from all the rows' lengths."""
  if not widths:
    return batch
  return cut_to_width(batch, fit_width(int(lengths.max()), widths))


def rows_for_step(step: int, batch_size: int, n: int,
                  epoch_order: Callable[[int], np.ndarray]) -> np.ndarray:
  """Global row indices of step's batch of `batch_size` from `n` rows visited in
  `epoch_order(epoch)` (a batch may straddle two epochs): a pure function of the step."""
  pos = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs = pos // n
  out = np.empty_like(pos)
  for e in np.unique(epochs):
    sel = epochs == e
    out[sel] = epoch_order(int(e))[pos[sel] % n]
  return out


def count_tsv_rows(path: str, field: str = "data.train") -> int:
  """Data rows of a TSV file as `read_tsv` counts them (non-blank lines after the header),
  without parsing: `train.epochs` turns into steps before the data are built."""
  p = Path(path)
  if not p.is_file():
    raise DataFileNotFoundError(f"config '{field}'={path!r}: no such file; "
                                f"{missing_hint(field)}")
  with p.open("rb") as f:
    next(f, None)
    return sum(1 for line in f if line.strip())


def resolve_epochs(cfg) -> None:
  """`train.epochs` > 0 (task cls): sets train.steps to that many passes over data.train
  (capped by data.max_train), and eval_every / ckpt_every left at 0 to the last step.
  Run before `validate`, so the steps it derives are checked like given ones."""
  t, d = cfg.train, cfg.data
  if t.epochs <= 0 or cfg.task != "cls":  # validate refuses epochs for other tasks
    return
  rows = count_tsv_rows(d.train)
  rows = min(rows, d.max_train) if d.max_train else rows
  if d.get("per_label", 0):
    rows = len(per_label_rows(read_tsv(d.train, d.text_b, d.max_train, field="data.train"
                                       ).labels, d.per_label, cfg.seed))
  k = max(1, t.steps_per_call)
  steps = -(-int(np.ceil(t.epochs * rows / t.batch_size)) // k) * k
  t.steps = max(steps, k)
  for name in ("eval_every", "ckpt_every"):
    if t[name] == 0:
      t[name] = t.steps


@dataclasses.dataclass
class ClassificationData:
  """Shuffled-per-epoch training batches and the whole dev set (padded, weight 0).

  Batches are cut to the narrowest of `widths` that holds their longest row; with
  `sort_window` > 1 the rows of each window of that many batches are grouped by length first
  (`sorted_windows`). Both are pure functions of (seed, step), so resuming is exact.
  """

  tokenizer: Any
  label_set: list[str]
  train: dict[str, np.ndarray]
  dev: dict[str, np.ndarray]
  batch_size: int  # global
  seed: int
  process_index: int = 0
  process_count: int = 1
  widths: tuple[int, ...] = ()  # empty: the stored width (seq_len) only
  sort_window: int = 0

  def __post_init__(self):
    self.train_lengths = row_lengths(self.train)
    self.dev_lengths = row_lengths(self.dev)
    self._epoch_cache: dict[int, np.ndarray] = {}

  @property
  def num_train(self) -> int:
    return len(self.train["labels"])

  def _local(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return local_rows(batch, self.process_index, self.process_count)

  def _cut(self, batch: dict[str, np.ndarray], lengths: np.ndarray) -> dict[str, np.ndarray]:
    return cut_to_fit(batch, lengths, self.widths)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Epoch `epoch`'s row order: a fresh permutation seeded by (seed, epoch), grouped by
    length within sort windows."""
    if epoch not in self._epoch_cache:
      rng = np.random.default_rng([self.seed, epoch, 0x636C73])
      order = rng.permutation(self.num_train)
      order = sorted_windows(order, self.train_lengths, self.batch_size, self.sort_window, rng)
      self._epoch_cache = {epoch: order}  # steps run forward: one epoch cached at a time
    return self._epoch_cache[epoch]

  def rows_for_step(self, step: int) -> np.ndarray:
    return rows_for_step(step, self.batch_size, self.num_train, self.epoch_order)

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    idx = self.rows_for_step(step)
    batch = self._cut({k: v[idx] for k, v in self.train.items()}, self.train_lengths[idx])
    return self._local(batch)

  def val_batches(self) -> list[dict[str, np.ndarray]]:
    """Every dev row once, shortest first when cutting to widths (less padding); the last
    batch is filled with copies of its first row at weight 0."""
    n, b = len(self.dev["labels"]), self.batch_size
    order = (np.argsort(self.dev_lengths, kind="stable") if self.widths
             else np.arange(n))
    out = []
    for lo in range(0, n, b):
      idx = order[lo:lo + b]
      real = np.arange(b) < len(idx)
      idx = np.concatenate([idx, np.full(b - len(idx), idx[0], idx.dtype)])
      batch = {k: v[idx] for k, v in self.dev.items()}
      batch["weights"] = batch["weights"] * real
      out.append(self._local(self._cut(batch, self.dev_lengths[idx])))
    return out

  def state(self, step: int = 0) -> dict:
    import hashlib
    h = hashlib.sha256(np.ascontiguousarray(self.train["inputs"]).tobytes()).hexdigest()[:16]
    return {"kind": "cls", "seed": self.seed, "fingerprint": h,
            "rows_per_epoch": [self.num_train], "step": int(step),
            "widths": list(self.widths), "sort_window": int(self.sort_window)}

  def restore(self, state: dict, step: int) -> None:
    check_state(self.state(step), state)


def per_label_rows(labels: list[str], n: int, seed: int) -> np.ndarray:
  """Sorted indices of `n` rows per label (all of a label's rows when it has fewer), drawn
  by a generator seeded with `seed`: the few-shot subset is the same on every run."""
  rng = np.random.default_rng([seed, 0x7368])
  labels_N = np.asarray(labels)
  picked = [rng.permutation(np.flatnonzero(labels_N == l))[:n] for l in sorted(set(labels))]
  return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def take_rows(texts: LabeledTexts, idx: np.ndarray) -> LabeledTexts:
  """The rows `idx` of `texts`, in that order."""
  return LabeledTexts([texts.text_a[i] for i in idx],
                      None if texts.text_b is None else [texts.text_b[i] for i in idx],
                      [texts.labels[i] for i in idx], texts.path)


def resolve_label_set(d, train: LabeledTexts) -> list[str]:
  if d.labels:
    return [l.strip() for l in d.labels.split(",")]
  found = set(train.labels)
  if all(l.lstrip("-").isdigit() for l in found):  # 0,1,...,10 in numeric order
    return sorted(found, key=int)
  return sorted(found)


def cls_tokenizer(cfg):
  """Classification's pretrained tokenizer: config 'data.tokenizer_path', else the
  `model.init_from` source's (a Hugging Face folder or an lmos workdir)."""
  return load_pretrained(cfg.data.tokenizer_path or cfg.model.init_from)


def build_cls_data(cfg, process_index: int = 0, process_count: int = 1) -> ClassificationData:
  """Reads data.train/data.dev, tokenizes with the pretrained tokenizer, checks labels."""
  d = cfg.data
  if not d.train or not d.dev:
    raise ConfigError("task 'cls' needs config 'data.train' and 'data.dev' (TSV files with a "
                      "header row naming the text and label columns)")
  tok = cls_tokenizer(cfg)
  train = read_tsv(d.train, d.text_b, d.max_train, field="data.train")
  if d.get("per_label", 0):
    train = take_rows(train, per_label_rows(train.labels, d.per_label, cfg.seed))
  dev = read_tsv(d.dev, d.text_b, field="data.dev")
  label_set = resolve_label_set(d, train)
  if cfg.model.num_labels != len(label_set):
    raise ConfigError(f"config 'model.num_labels'={cfg.model.num_labels} but the label set "
                      f"has {len(label_set)} labels {label_set}; set model.num_labels="
                      f"{len(label_set)}")
  return ClassificationData(tok, label_set, classifier_rows(tok, train, label_set, d.seq_len),
                            classifier_rows(tok, dev, label_set, d.seq_len),
                            cfg.train.batch_size, cfg.seed, process_index, process_count,
                            tuple(bucket_widths(d.buckets, d.seq_len)), d.sort_window)
