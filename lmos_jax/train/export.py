"""`lmos export`: params-only copy of a training checkpoint, for inference.

Why: a train checkpoint also holds the optimizer moments (2x the params for Adam) and the
RNG; serving needs only the weights, often in bf16. The export is read back with
`load_params` without building an optimizer, onto any sharding (one device by default).

Layout of OUT: params/ (an orbax PyTree checkpoint), config.json, tokenizer.json (copied
from the workdir when present) and export.json (source, step, dtype, fingerprint).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from lmos_jax.errors import UserError
from lmos_jax.train.checkpoint import (Checkpointer, CheckpointError, CheckpointReadError,
                                       abandoned_reads_quiet, fingerprint, fingerprint_mismatch,
                                       without_absl_warnings)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "keep": None}


def _abstract_from_metadata(tree_metadata: Any, sharding) -> Any:
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                      tree_metadata)


def _restore_subtree(item_dir: Path, key: str, sharding) -> Any:
  """Reads only `key` (e.g. params) of a saved state tree: the optimizer is never loaded."""
  ckptr = ocp.PyTreeCheckpointer()
  metadata = ckptr.metadata(item_dir)
  tree = getattr(metadata, "item_metadata", metadata)
  abstract = {key: _abstract_from_metadata(tree[key], sharding)}
  args = ocp.args.PyTreeRestore(item=abstract,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                partial_restore=True)
  return ckptr.restore(item_dir, args=args)[key]


def read_train_params(workdir: Path, step: int | None = None, sharding=None
                      ) -> tuple[int, Any, dict]:
  """(step, params, meta) from WORKDIR/checkpoints, checked against the saved fingerprint."""
  ckpt = Checkpointer(workdir, read_only=True)
  steps = ckpt.all_steps()
  if not steps or (step is not None and int(step) not in steps):
    ckpt.close()
  if not steps:
    raise CheckpointReadError(f"no checkpoint under {ckpt.directory}; train first or pass "
                              "the right --workdir")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise CheckpointReadError(f"--step={step}: {ckpt.directory} has steps {steps}")
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  try:  # orbax's notes on the item-level metadata a trainer checkpoint does not keep: noise
    with abandoned_reads_quiet(), without_absl_warnings("Metadata file does not exist",
                                                        "Failed to get item metadata"):
      meta = ckpt.restore_meta(step)
      params = _restore_subtree(ckpt.step_dir(step) / "state", "params", sharding)
  except Exception as e:  # noqa: BLE001 - any read failure: this step is unusable
    raise CheckpointReadError(f"checkpoint {ckpt.step_dir(step)} cannot be read, it is corrupt "
                              f"or truncated ({type(e).__name__}: {str(e)[:200]}); export an "
                              f"earlier --step (steps: {steps})") from None
  finally:
    ckpt.close()
  expected = {k[len("['params']"):]: v for k, v in meta.get("fingerprint", {}).items()
              if k.startswith("['params']")}
  if expected and fingerprint_mismatch(expected, params):
    raise CheckpointReadError(f"checkpoint {ckpt.step_dir(step)} is corrupt (params differ "
                              "from their saved fingerprint); export an earlier --step")
  return step, params, meta


def cast_params(params: Any, dtype) -> Any:
  """Floating leaves to `dtype` (None keeps them); integer leaves are never touched."""
  if dtype is None:
    return params
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                      else x, params)


def export_params(workdir: str | Path, out: str | Path, step: int | None = None,
                  dtype: str = "keep") -> Path:
  """Writes OUT (see the module docstring) and returns it."""
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
  workdir, out = Path(workdir).absolute(), Path(out).absolute()
  if (out / "params").exists():
    raise UserError(f"--out={out}: {out / 'params'} exists; pass a new --out directory (an "
                    "export is never overwritten)")
  step, params, meta = read_train_params(workdir, step)
  params = cast_params(params, DTYPES[dtype])
  out.mkdir(parents=True, exist_ok=True)
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(out / "params", args=ocp.args.PyTreeSave(params))
  if "config" in meta:
    (out / "config.json").write_text(json.dumps(json.loads(meta["config"]), indent=2))
  if (workdir / "tokenizer.json").exists():
    shutil.copy(workdir / "tokenizer.json", out / "tokenizer.json")
  info = {"source": str(workdir), "step": step, "dtype": dtype,
          "fingerprint": fingerprint(params), "versions": meta.get("versions", {})}
  (out / "export.json").write_text(json.dumps(info, indent=2))
  return out


def load_params(export_dir: str | Path, sharding=None) -> Any:
  """Params of an export, onto `sharding` (a pytree of shardings or one; default: device 0)."""
  export_dir = Path(export_dir).absolute()
  ckptr = ocp.PyTreeCheckpointer()
  metadata = ckptr.metadata(export_dir / "params")
  tree = getattr(metadata, "item_metadata", metadata)
  if sharding is None or isinstance(sharding, jax.sharding.Sharding):
    sh = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = _abstract_from_metadata(tree, sh)
  else:
    abstract = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                            tree, sharding)
  args = ocp.args.PyTreeRestore(item=abstract,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
  params = ckptr.restore(export_dir / "params", args=args)
  info_path = export_dir / "export.json"
  if info_path.exists():
    expected = json.loads(info_path.read_text()).get("fingerprint")
    bad = fingerprint_mismatch(expected, params) if expected else []
    if bad:
      raise CheckpointError(f"export {export_dir} is corrupt: {', '.join(bad[:3])} differ "
                            "from export.json's fingerprint")
  return params


def main(argv: list[str]) -> int:
  from absl import flags

  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "training run directory (with checkpoints/)",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "directory to write the export to", flag_values=fv)
  flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", flag_values=fv)
  flags.DEFINE_enum("dtype", "keep", list(DTYPES), "cast floating params", flag_values=fv)
  fv(argv)
  if not fv.workdir or not fv.out:
    print("lmos export: --workdir and --out are required", file=sys.stderr)
    return 2
  try:
    out = export_params(fv.workdir, fv.out, fv.step, fv.dtype)
  except UserError:
    raise  # `lmos` prints it as one line and exits 2
  except (CheckpointError, FileExistsError, ValueError) as e:
    print(f"lmos export: {e}", file=sys.stderr)
    return 1
  print(f"lmos export: wrote {out} (params only, dtype {fv.dtype})")
  return 0
