"""`lmos convert`: a Hugging Face folder into an lmos workdir, and a workdir back out.

  lmos convert --from-hf HF_DIR --workdir DIR [--num-labels N] [--force]
  lmos convert --to-hf OUT_DIR --workdir DIR [--force]

--from-hf writes config.json (lmos), hf_config.json, params/ and hf_tokenizer/ into DIR.
--to-hf writes a complete Hugging Face folder: config.json (with the run's label names as
id2label/label2id), model.safetensors and the tokenizer files, so transformers'
AutoTokenizer and AutoModelFor... load OUT_DIR alone and give lmos's ids and outputs.
Neither overwrites anything that exists without --force; --force on --from-hf moves the
run files it replaces into DIR/replaced-TIMESTAMP/ (checkpoints are never deleted).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from lmos_jax.config.schema import base_config
from lmos_jax.data.hf_tokenizer import write_hf_tokenizer
from lmos_jax.errors import ArgumentParser, UserError, number
from lmos_jax.models.factory import model_factory
from lmos_jax.models.hf import (HFSpec, check_hf_exportable, copy_tokenizer, load_hf_params,
                                model_config_from_spec, read_hf_config, save_hf,
                                spec_from_lmos_config)
from lmos_jax.models.quantized import has_qarrays
from lmos_jax.peft.methods import merged_params
from lmos_jax.workdir import (HF_CONFIG, HF_TOKENIZER, LABELS, PARAMS, TOKENIZER,
                              existing_run_files, label_names, read_config, read_tokenizer,
                              set_aside, workdir_params, write_config)

# Files of a Hugging Face model folder that --to-hf writes (and will not overwrite).
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json")


def from_hf_to_workdir(hf_dir: str | Path, workdir: str | Path, num_labels: int = 0,
                       force: bool = False) -> tuple[Path, Path | None]:
  """(workdir, where replaced run files went or None): config.json (lmos), hf_config.json,
  params/ (orbax) and hf_tokenizer/ from a Hugging Face folder."""
  wd = Path(workdir).absolute()
  existing = existing_run_files(wd)
  if existing and not force:
    raise UserError(f"--workdir {wd} already holds a run ({', '.join(existing)}); pass a new "
                    "--workdir, or --force to move those files into "
                    f"{wd}/replaced-TIMESTAMP/ first")
  spec, params = load_hf_params(hf_dir, num_labels=num_labels or None)  # fails before moving
  cfg = base_config()
  model_config_from_spec(spec, cfg.model)
  cfg.task = "mlm" if spec.head == "mlm" else "cls" if spec.head == "cls" else "lm"
  cfg.model.init_from = str(Path(hf_dir).absolute())
  moved = set_aside(wd, existing) if existing else None
  wd.mkdir(parents=True, exist_ok=True)
  write_config(wd, cfg)
  (wd / HF_CONFIG).write_text(json.dumps(read_hf_config(hf_dir), indent=2))
  (wd / HF_TOKENIZER).mkdir()
  copy_tokenizer(hf_dir, wd / HF_TOKENIZER)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(wd / PARAMS, params)
  return wd, moved


def export_config(cfg, spec: HFSpec, workdir: Path, tok) -> dict:
  """The keys config.json gets beyond the architecture: the original HF config's (for a
  `--from-hf` workdir), the tokenizer's special ids, and a classifier's label names."""
  base = (json.loads((workdir / HF_CONFIG).read_text()) if (workdir / HF_CONFIG).is_file()
          else {})
  specials = getattr(tok, "specials", {}) if tok is not None else {}
  for role in ("pad", "bos", "eos"):
    if role in specials:
      base[f"{role}_token_id"] = int(specials[role])
  if spec.head == "cls" and (workdir / LABELS).is_file():  # else: the HF config's, or LABEL_i
    names = label_names(workdir)
    if len(names) != spec.tcfg.num_labels:
      raise UserError(f"--workdir {workdir}: {len(names)} label names for a classifier with "
                      f"{spec.tcfg.num_labels} outputs (model.num_labels)")
    base["id2label"] = {str(i): n for i, n in enumerate(names)}
    base["label2id"] = {n: i for i, n in enumerate(names)}
  return base


def workdir_tokenizer(workdir: Path):
  """The run's tokenizer, or None for a `--from-hf` workdir whose tokenizer lmos cannot read
  (no tokenizer.json): its original files are copied as they are."""
  if not (workdir / TOKENIZER).is_file() and (workdir / HF_TOKENIZER).is_dir() and \
     not (workdir / HF_TOKENIZER / "tokenizer.json").is_file():
    return None
  return read_tokenizer(workdir)


def check_out_dir(out: Path, force: bool) -> None:
  clash = [n for n in HF_FILES if (out / n).exists()]
  if clash and not force:
    raise UserError(f"--to-hf {out} already holds {', '.join(clash)}; pass a new directory "
                    "or --force to overwrite")


def to_hf_from_workdir(workdir: str | Path, out_dir: str | Path, force: bool = False) -> Path:
  """A complete HF folder (see the module docstring) from a workdir's latest params."""
  wd, out = Path(workdir), Path(out_dir)
  cfg = read_config(wd)
  params = workdir_params(wd)
  if has_qarrays(params):
    raise UserError(f"--workdir {wd} holds int8/int4 codes (lmos compress --method int8|int4) "
                    "and a Hugging Face folder holds float weights: export its source run, or "
                    "a pruned, trimmed or distilled one")
  vocab = int(np.asarray(params["embed"]).shape[0])
  spec = spec_from_lmos_config(cfg.model, vocab)
  check_hf_exportable(spec)
  check_out_dir(out, force)
  tok = workdir_tokenizer(wd)
  if cfg.peft.method != "full":  # fold LoRA/AdaLoRA into the kernels
    params = merged_params(model_factory(cfg.model, vocab), cfg.peft, params)
  if tok is not None and tok.vocab_size > vocab:
    raise UserError(f"--workdir {wd}: the tokenizer has {tok.vocab_size} ids but the model "
                    f"embeds {vocab}")
  base = export_config(cfg, spec, wd, tok)
  out.mkdir(parents=True, exist_ok=True)
  if tok is None:
    save_hf(spec, params, out, base, wd / HF_TOKENIZER)
    return out
  save_hf(spec, params, out, base)
  length = cfg.data.seq_len if spec.head == "cls" else cfg.model.max_seq_len
  write_hf_tokenizer(tok, out, model_max_length=int(length), classifier=spec.head == "cls",
                     token_type_ids=spec.family == "bert")
  return out


def main(argv: list[str]) -> int:
  ap = ArgumentParser(prog=argv[0], description=__doc__.split("\n\n")[0])
  g = ap.add_mutually_exclusive_group(required=True)
  g.add_argument("--from-hf", metavar="HF_DIR", help="Hugging Face folder to read")
  g.add_argument("--to-hf", metavar="OUT_DIR", help="Hugging Face folder to write")
  ap.add_argument("--workdir", required=True, help="lmos workdir (written or read)")
  ap.add_argument("--num-labels", type=number(int, 0), default=0,
                  help="with --from-hf on a BERT encoder: add a fresh classifier head")
  ap.add_argument("--force", action="store_true",
                  help="--from-hf: move an existing run's files in --workdir aside to "
                       "WORKDIR/replaced-TIMESTAMP/; --to-hf: overwrite OUT_DIR's files")
  args = ap.parse_args(argv[1:])
  try:
    if args.from_hf:
      wd, moved = from_hf_to_workdir(args.from_hf, args.workdir, args.num_labels, args.force)
      print(f"lmos convert: {args.from_hf} -> {wd} ({PARAMS}/, config.json)"
            + (f"; the run files it replaced are in {moved}" if moved else ""))
    else:
      out = to_hf_from_workdir(args.workdir, args.to_hf, args.force)
      print(f"lmos convert: {args.workdir} -> {out} (config.json, model.safetensors, "
            "tokenizer files)")
  except UserError as e:
    print(f"lmos convert: {e}", file=sys.stderr)
    return 2
  return 0
