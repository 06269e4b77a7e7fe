"""`lmos predict --workdir DIR "sentence" ...`: label and probability from a finetuned classifier.

Params come from the workdir: for a PEFT run, the base weights of `model.init_from` with
`adapters.safetensors` (adapters + head only) applied on top; otherwise the latest
checkpoint. Tokenizer and label names are the side files `lmos train` wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def load_run_config(workdir: Path):
  import ml_collections
  path = workdir / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"--workdir {workdir}: no config.json (run `lmos train` first)")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def classifier_params(cfg, workdir: Path, abstract: dict) -> dict:
  """Full param tree: base + adapters for PEFT runs, else the latest trainer checkpoint."""
  from lmos_jax.train.init_from import init_from_params
  from lmos_jax.workdir import int_keys, workdir_params
  from lmos_jax.peft.wrap import load_adapters, overlay_params, split_by
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  adapters = workdir / "adapters.safetensors"
  if cfg.peft.method != "full" and adapters.is_file():
    base, _ = init_from_params(cfg, abstract["embed"].shape[0])
    flat_base, _ = split_by(base, lambda _: True)
    params = overlay_params(zeros, flat_base, f"model.init_from={cfg.model.init_from}")
    flat, _ = load_adapters(str(adapters))
    return overlay_params(params, flat, str(adapters))
  flat, _ = split_by(int_keys(workdir_params(workdir)), lambda _: True)
  return overlay_params(zeros, flat, f"{workdir}/checkpoints")


def build_classifier(workdir: str | Path):
  """(predict_fn(texts_a, texts_b) -> probs (N, C), label names, seq_len)."""
  from flax import nnx
  from lmos_jax.data.encoder import encode_for_classifier
  from lmos_jax.data.tokenizer import tokenizer_from_info
  from lmos_jax.models.factory import model_factory
  from lmos_jax.peft.methods import wrap_factory

  wd = Path(workdir)
  cfg = load_run_config(wd)
  if cfg.task != "cls":
    raise ValueError(f"--workdir {wd}: task={cfg.task!r} is not a classifier (task 'cls')")
  tok = tokenizer_from_info(json.loads((wd / "tokenizer.json").read_text()))
  labels = json.loads((wd / "labels.json").read_text())
  make = wrap_factory(model_factory(cfg.model, tok.vocab_size), cfg.peft)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  params = jax.tree.map(jnp.asarray, classifier_params(cfg, wd, nnx.to_pure_dict(abstract)))

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
  import argparse
  ap = argparse.ArgumentParser(prog=argv[0], description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, help="workdir of a finetuned classifier")
  ap.add_argument("--pair", default=None,
                  help="second sentence for sentence-pair tasks (applied to every sentence)")
  ap.add_argument("sentences", nargs="+", help="sentences to classify")
  args = ap.parse_args(argv[1:])
  try:
    predict, labels, _ = build_classifier(args.workdir)
  except (FileNotFoundError, ValueError) as e:
    print(f"lmos predict: {e}", file=sys.stderr)
    return 2
  pairs = [args.pair] * len(args.sentences) if args.pair is not None else None
  p = predict(args.sentences, pairs)
  for s, row in zip(args.sentences, p):
    k = int(np.argmax(row))
    print(f"{labels[k]}\t{row[k]:.4f}\t{s}", flush=True)
  return 0
