"""`lmos predict --workdir DIR "sentence" ...`: label and probability from a finetuned classifier.

Params come from the workdir: for a PEFT run, the base weights of `model.init_from` with
`adapters.safetensors` (adapters + head only) applied on top; otherwise the latest
checkpoint. Config, tokenizer and label names are the side files `lmos train` wrote, read
through lmos_jax.workdir (no training data is needed).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmos_jax.errors import UserError
from lmos_jax.workdir import (ADAPTERS, label_names, model_layout, read_config, read_tokenizer,
                              workdir_params)


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


def build_classifier(workdir: str | Path):
  """(predict_fn(texts_a, texts_b) -> probs (N, C), label names, config), all read from the
  workdir: config.json, tokenizer.json, labels.json and the latest params."""
  from flax import nnx
  from lmos_jax.data.encoder import encode_for_classifier

  wd = Path(workdir)
  cfg = read_config(wd)
  if cfg.task != "cls":
    raise UserError(f"--workdir {wd}: task={cfg.task!r} is not a classifier (task 'cls')")
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

  def predict(texts_a: Sequence[str], texts_b: Sequence[str] | None = None) -> np.ndarray:
    batch = encode_for_classifier(tok, texts_a, texts_b, cfg.data.seq_len)
    return np.asarray(probs(params, batch))
  return predict, labels, cfg


def main(argv: list[str]) -> int:
  from lmos_jax.errors import ArgumentParser, existing_dir
  ap = ArgumentParser(prog=argv[0], description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, type=existing_dir("config.json"),
                  help="workdir of a finetuned classifier")
  ap.add_argument("--pair", default=None,
                  help="second sentence for sentence-pair tasks (applied to every sentence)")
  ap.add_argument("sentences", nargs="+", help="sentences to classify")
  args = ap.parse_args(argv[1:])
  try:
    predict, labels, _ = build_classifier(args.workdir)
  except UserError as e:
    print(f"lmos predict: {e}", file=sys.stderr)
    return 2
  pairs = [args.pair] * len(args.sentences) if args.pair is not None else None
  p = predict(args.sentences, pairs)
  for s, row in zip(args.sentences, p):
    k = int(np.argmax(row))
    print(f"{labels[k]}\t{row[k]:.4f}\t{s}", flush=True)
  return 0
