"""The run directory: one owner for what a workdir holds and how it is read back.

A workdir holds `config.json` (the run's config), `tokenizer.json`, `labels.json` (a
classifier's label names in id order), `checkpoints/` (orbax train states), and, when made by
`lmos convert --from-hf`, `params/`, `hf_config.json` and `hf_tokenizer/`. Generate, predict,
compress, convert, export and serve read a run only through this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lmos_jax.errors import UserError
from lmos_jax.models.hf import HFConversionError


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """The run config a workdir was made with (its config.json)."""
  path = Path(workdir) / "config.json"
  if not path.is_file():
    raise UserError(f"{workdir}: no config.json; not an lmos workdir (run `lmos train` or "
                    "`lmos convert --from-hf` into it first)")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def workdir_params(workdir: str | Path) -> dict:
  """Latest params of a workdir as host numpy: the newest trainer checkpoint, else the
  params/ that `lmos convert --from-hf` wrote. Dict keys come back as strings."""
  wd = Path(workdir).absolute()
  ckpt_dir = wd / "checkpoints"
  steps = sorted(int(p.name) for p in ckpt_dir.glob("[0-9]*")
                 if p.is_dir() and p.name.isdigit()) if ckpt_dir.is_dir() else []
  if steps:
    return restore_numpy(ckpt_dir / str(steps[-1]) / "state")["params"]
  if (wd / "params").is_dir():
    return restore_numpy(wd / "params")
  raise HFConversionError(f"--workdir {workdir}: no checkpoints/ or params/ to convert; run "
                          "`lmos train` or `lmos convert --from-hf` into it first")


def restore_numpy(path: Path) -> Any:
  """An orbax pytree read back as numpy arrays, with no device placement."""
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def int_keys(tree):
  """Orbax stores dict keys as strings; unscanned layer indices come back as '0', '1'..."""
  if isinstance(tree, dict):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): int_keys(v)
            for k, v in tree.items()}
  return tree
