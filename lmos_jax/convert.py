"""`lmos convert`: a Hugging Face folder into an lmos workdir, and a workdir back out.

  lmos convert --from-hf HF_DIR --workdir DIR   (params + lmos config.json into DIR)
  lmos convert --to-hf OUT_DIR --workdir DIR    (latest params of DIR -> HF layout in OUT_DIR)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lmos_jax.config.schema import base_config
from lmos_jax.errors import ArgumentParser, number
from lmos_jax.models.factory import model_factory
from lmos_jax.models.hf import (HFConversionError, copy_tokenizer, load_hf_params,
                                model_config_from_spec, read_hf_config, save_hf,
                                spec_from_lmos_config)
from lmos_jax.peft.methods import merged_params
from lmos_jax.workdir import int_keys, workdir_params


def from_hf_to_workdir(hf_dir: str | Path, workdir: str | Path, num_labels: int = 0) -> Path:
  """lmos workdir: config.json (lmos), hf_config.json, params/ (orbax), hf_tokenizer/."""
  wd = Path(workdir).absolute()
  wd.mkdir(parents=True, exist_ok=True)
  spec, params = load_hf_params(hf_dir, num_labels=num_labels or None)
  cfg = base_config()
  model_config_from_spec(spec, cfg.model)
  cfg.task = "mlm" if spec.head == "mlm" else "cls" if spec.head == "cls" else "lm"
  cfg.model.init_from = str(Path(hf_dir).absolute())
  (wd / "config.json").write_text(cfg.to_json(indent=2))
  (wd / "hf_config.json").write_text(json.dumps(read_hf_config(hf_dir), indent=2))
  tok = wd / "hf_tokenizer"
  tok.mkdir(exist_ok=True)
  copy_tokenizer(hf_dir, tok)
  target = wd / "params"
  if target.exists():
    shutil.rmtree(target)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, params)
  return wd


def to_hf_from_workdir(workdir: str | Path, out_dir: str | Path) -> Path:
  """HF folder from a workdir's lmos config.json and latest params."""
  wd = Path(workdir)
  if not (wd / "config.json").is_file():
    raise HFConversionError(f"--workdir {workdir}: no config.json (not an lmos workdir)")
  cfg = ml_collections.ConfigDict(json.loads((wd / "config.json").read_text()))
  params = int_keys(workdir_params(wd))
  if cfg.get("peft") and cfg.peft.method != "full":  # fold LoRA/AdaLoRA into the kernels
    vocab = int(np.asarray(params["embed"]).shape[0])
    params = merged_params(model_factory(cfg.model, vocab), cfg.peft, params)
  spec = spec_from_lmos_config(cfg.model, int(np.asarray(params["embed"]).shape[0]))
  base = json.loads((wd / "hf_config.json").read_text()) \
      if (wd / "hf_config.json").is_file() else {}
  labels_file = wd / "labels.json"  # a classifier run's label names, in id order
  if spec.head == "cls" and labels_file.is_file():
    names = [str(x) for x in json.loads(labels_file.read_text())]
    if len(names) == spec.tcfg.num_labels:
      base = {**base, "id2label": {str(i): n for i, n in enumerate(names)},
              "label2id": {n: i for i, n in enumerate(names)}}
  tok = wd / "hf_tokenizer"
  return save_hf(spec, params, out_dir, base, tok if tok.is_dir() else None)


def main(argv: list[str]) -> int:
  ap = ArgumentParser(prog=argv[0], description=__doc__.split("\n\n")[0])
  g = ap.add_mutually_exclusive_group(required=True)
  g.add_argument("--from-hf", metavar="HF_DIR", help="Hugging Face folder to read")
  g.add_argument("--to-hf", metavar="OUT_DIR", help="Hugging Face folder to write")
  ap.add_argument("--workdir", required=True, help="lmos workdir (written or read)")
  ap.add_argument("--num-labels", type=number(int, 0), default=0,
                  help="with --from-hf on a BERT encoder: add a fresh classifier head")
  args = ap.parse_args(argv[1:])
  try:
    if args.from_hf:
      wd = from_hf_to_workdir(args.from_hf, args.workdir, args.num_labels)
      print(f"lmos convert: {args.from_hf} -> {wd} (params/, config.json)")
    else:
      out = to_hf_from_workdir(args.workdir, args.to_hf)
      print(f"lmos convert: {args.workdir} -> {out} (config.json, model.safetensors)")
  except HFConversionError as e:
    print(f"lmos convert: {e}", file=sys.stderr)
    return 2
  return 0
