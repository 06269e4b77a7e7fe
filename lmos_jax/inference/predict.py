"""`lmos predict --workdir DIR "sentence" ...` (or `--input FILE`): label and probability from
a finetuned classifier.

Params come from the workdir: for a PEFT run, the base weights of `model.init_from` with
`adapters.safetensors` (adapters + head only) applied on top; otherwise the latest
checkpoint. Config, tokenizer and label names are the side files `lmos train` wrote, read
through lmos_jax.workdir (no training data is needed).

Batch mode, `lmos predict --workdir DIR --input FILE [--output OUT.jsonl] [--batch-size N]`,
classifies a TSV/CSV (header row), JSONL or plain-text file, or stdin (`-`, streamed), and
writes one JSON object per input line, in input order. Texts are encoded to `data.seq_len`
and, a chunk of lines at a time, packed: several texts side by side in a row of seq_len
tokens, each with its own positions and an attention segment of its own (its outputs are
those of the text alone), rows filled first-fit-decreasing. The rows run `--batch-size`/4 at
a time (the tokens of about --batch-size texts), so every full batch has one shape and a file
compiles two or three programs; the rows of the last batch take the fixed shape with the
fewest tokens. SST-2's dev set (872 texts, 22,213 tokens) runs as 22,400 positions in two
shapes, against 45,648 when each batch of 64 is padded to its longest text in input order
(transformers' pipeline); and rows of 64 run faster per token on CPU than many short rows.
Bad lines become
`{"error": ...}` records at their position; a bad file is one line on stderr (exit 2) before
the model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmos_jax.data.packing import PackShape
from lmos_jax.errors import UserError
from lmos_jax.inference.inputs import InputSpec, Row, check_gold, read_rows, stdin_groups
from lmos_jax.models.quantized import has_qarrays
from lmos_jax.parallel.compile_cache import enable_compile_cache
from lmos_jax.workdir import (ADAPTERS, check_params_fit, label_names, model_layout,
                              read_config, read_tokenizer, workdir_params)

CHUNK_BATCHES = 32  # files: lines are packed together in chunks of this many batch sizes


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
  stored = workdir_params(workdir)
  if has_qarrays(stored) or any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(stored)):
    # a compressed run (lmos compress --method int8|int4|bf16): complete, kept as stored
    check_params_fit(abstract, stored, f"--workdir {workdir}")
    return stored
  flat, _ = split_by(stored, lambda _: True)
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
  """A loaded classifier. `forward(batch) -> probs (B, C)` runs one text per row, on an
  encoded batch dict (inputs, token_type_ids, attention_mask; any width <= seq_len): the
  reference layout, as in training. `forward_packed(batch) -> (probs (S, C), embeddings
  (S, D))` runs a packed batch (`lmos_jax.data.packing.pack_texts`: S text slots in R rows)
  and returns both per text: the sentence embedding is the mean of the text's final hidden
  states, L2-normalised (sentence-transformers' pooling for MiniLM), so retrieval and topic
  clustering use cosine similarity as a plain dot product.

  Both return as soon as the batch is dispatched (JAX arrays still computing;
  `np.asarray` waits for them), so a caller can prepare the next batch while this one runs."""

  cfg: Any
  tokenizer: Any
  labels: list[str]
  forward: Callable[[dict[str, np.ndarray]], np.ndarray]
  forward_packed: Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]] | None = None

  def encode(self, texts_a: Sequence[str], texts_b: Sequence[str] | None = None
             ) -> dict[str, np.ndarray]:
    from lmos_jax.data.encoder import encode_for_classifier
    return encode_for_classifier(self.tokenizer, texts_a, texts_b, self.cfg.data.seq_len)

  def predict(self, texts_a: Sequence[str], texts_b: Sequence[str] | None = None
              ) -> np.ndarray:
    """probs (N, C) of the sentences, one batch padded to seq_len."""
    return np.asarray(self.forward(self.encode(texts_a, texts_b)))


def load_classifier(workdir: str | Path) -> Classifier:
  """The classifier of a workdir: config.json, tokenizer.json, labels.json and the latest
  params (base + adapters for PEFT runs; LoRA and AdaLoRA folded into the kernels)."""
  from flax import nnx

  wd = Path(workdir)
  cfg = classifier_config(wd)
  tok = read_tokenizer(wd)
  labels = label_names(wd)
  # the run's compile cache: a second `lmos predict` (or a server restart) reads its few
  # bucket-width programs back instead of compiling each one again
  enable_compile_cache(str(cfg.train.get("compile_cache", "auto")))
  graphdef, abstract = model_layout(cfg, tok.vocab_size)
  if len(labels) != cfg.model.num_labels:
    raise UserError(f"--workdir {wd}: {len(labels)} label names for "
                    f"model.num_labels={cfg.model.num_labels}")
  try:
    params = jax.tree.map(jnp.asarray, classifier_params(cfg, wd, abstract))
  except ValueError as e:  # a tensor that does not fit the config's model
    raise UserError(str(e)) from None
  if cfg.peft.method in ("lora", "adalora") and not has_qarrays(params):
    from lmos_jax.peft.methods import merged_model
    graphdef, params = merged_model(graphdef, params)

  @jax.jit
  def probs(p, batch):
    logits = nnx.merge(graphdef, p)(batch["inputs"], token_type_ids=batch["token_type_ids"],
                                    attention_mask=batch["attention_mask"])
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  @jax.jit
  def probs_embed_packed(p, batch):
    model = nnx.merge(graphdef, p)
    x_RWD = model.encode(batch["inputs"], token_type_ids=batch["token_type_ids"],
                         position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
    return packed_heads(model, x_RWD, batch["cls_index"], batch["text_index"])

  keys = ("inputs", "token_type_ids", "attention_mask")
  packed_keys = ("inputs", "token_type_ids", "position_ids", "segment_ids", "cls_index",
                 "text_index")

  def forward(batch: dict[str, np.ndarray]) -> jax.Array:
    return probs(params, {k: batch[k] for k in keys})

  def forward_packed(batch: dict[str, np.ndarray]) -> tuple[jax.Array, jax.Array]:
    return probs_embed_packed(params, {k: batch[k] for k in packed_keys})
  return Classifier(cfg, tok, labels, forward, forward_packed)


def packed_heads(model, x_RWD: jax.Array, cls_index_S: jax.Array, text_index_RW: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """(probs (S, C), embeddings (S, D)) per text of a packed batch: the classifier on each
  text's sentence vector (the pooled first token ([CLS]), or the mean of its tokens, as the
  model's `pooling` says), and the L2-normalised mean of its tokens' final hidden states.
  Shapes: R rows, W tokens per row, N = R*W tokens, S text slots, D model width."""
  s = cls_index_S.shape[0]
  x_ND = x_RWD.reshape(-1, x_RWD.shape[-1]).astype(jnp.float32)
  # each text's tokens summed by their text index (padding's index S lands in a dropped slot)
  ids_N = text_index_RW.reshape(-1)
  sum_SD = jax.ops.segment_sum(x_ND, ids_N, num_segments=s + 1)[:s]
  count_S1 = jax.ops.segment_sum(jnp.ones_like(ids_N, jnp.float32), ids_N,
                                 num_segments=s + 1)[:s, None]
  mean_SD = sum_SD / jnp.maximum(count_S1, 1.0)
  # the pooling reads a one-token "sentence" per text: its [CLS] state, or its mean
  first_SD = mean_SD if model.cfg.pooling == "mean" else x_ND[cls_index_S]
  logits_SC = model.classifier(model.pool(first_SD[:, None, :].astype(x_RWD.dtype)))
  norm_S1 = jnp.maximum(jnp.linalg.norm(mean_SD, axis=-1, keepdims=True), 1e-12)
  return jax.nn.softmax(logits_SC.astype(jnp.float32), axis=-1), mean_SD / norm_S1


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
  """probs (N, C) in input order, batched as `classify_embed_rows`."""
  return classify_embed_rows(clf, texts_a, texts_b, batch_size, widths)[0]


def classify_embed_rows(clf: Classifier, texts_a: Sequence[str],
                        texts_b: Sequence[str] | None, batch_size: int,
                        widths: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """(probs (N, C), sentence embeddings (N, D)) in input order. The texts are packed into
  rows of the widest width, and the rows run `rows_per_batch(batch_size)` at a time: every
  full batch has one shape, whatever the lengths, so a file compiles two or three programs."""
  rows = rows_per_batch(batch_size)
  return run_packed(clf, texts_a, texts_b, widths, rows, rows * widths[-1] // 2)


def rows_per_batch(batch_size: int) -> int:
  """Packed rows per batch for a batch size counted in texts: a quarter of it, since texts
  take about a quarter of seq_len or less on average in the classification sets here (of 64
  tokens: SST-2 dev 25.5, train 13.4; BANKING77 16), so a batch carries the tokens of about
  batch_size texts."""
  return max(1, batch_size // 4)


def run_packed(clf: Classifier, texts_a: Sequence[str], texts_b: Sequence[str] | None,
               widths: Sequence[int], max_rows: int, max_texts: int
               ) -> tuple[np.ndarray, np.ndarray]:
  """(probs (N, C), embeddings (N, D)) in input order: the texts encoded, packed
  (`lmos_jax.data.packing.plan_batches`) and run through `Classifier.forward_packed`, every
  batch with `max_texts` text slots (so each shape of `pack_shapes(widths, max_rows)` is one
  program). All batches are dispatched before the first result is read back."""
  from lmos_jax.data.encoder import row_lengths
  from lmos_jax.data.packing import pack_texts, plan_batches
  n = len(texts_a)
  probs = np.zeros((n, len(clf.labels)), np.float32)
  emb = np.zeros((n, clf.cfg.model.d_model), np.float32)
  if n == 0:
    return probs, emb
  rows = clf.encode(texts_a, texts_b)
  lengths = row_lengths(rows)
  running = []
  for plan in plan_batches(lengths, widths, max_rows, max_texts):
    batch = pack_texts({k: v[plan.texts] for k, v in rows.items()}, lengths[plan.texts],
                       plan.shape, plan.row, plan.offset, max_texts)
    running.append((plan.texts, clf.forward_packed(batch)))
  for idx, (p, e) in running:
    probs[idx] = np.asarray(p)[:len(idx)]
    emb[idx] = np.asarray(e)[:len(idx)]
  return probs, emb


def empty_packed_batch(shape: PackShape, max_texts: int) -> dict[str, np.ndarray]:
  """A packed batch of `shape` holding one one-token text: compiles that shape."""
  from lmos_jax.data.packing import pack_texts
  one = {"inputs": np.zeros((1, 1), np.int32), "token_type_ids": np.zeros((1, 1), np.int32)}
  return pack_texts(one, np.ones(1, np.int32), shape, np.zeros(1, np.int32),
                    np.zeros(1, np.int32), max_texts)


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
  if out_path is not None and out_path.exists() and not args.force:
    raise UserError(f"--output {args.output} already exists; give a new file name, or --force "
                    "to overwrite it")
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
  ap.add_argument("--force", action="store_true",
                  help="with --output: overwrite an existing file")
  ap.add_argument("--batch-size", type=number(int, 1), default=64,
                  help="with --input: texts per batch, about (default 64): batches are "
                       "N/4 packed rows of data.seq_len tokens")
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
      if getattr(args, flag) is not None or (flag == "output" and args.force):
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
