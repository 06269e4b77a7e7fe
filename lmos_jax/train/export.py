"""`lmos export`: params-only copy of a training checkpoint, for inference.

Why: a train checkpoint also holds the optimizer moments (2x the params for Adam) and the
RNG; serving needs only the weights, often in bf16. The export is read back with
`load_export` without building an optimizer, onto any sharding (one device by default).

Layout of OUT: params/ (an orbax PyTree checkpoint), config.json, tokenizer.json and
labels.json (copied from the workdir when present) and export.json (source, step, dtype,
fingerprint). The checkpoint is read through lmos_jax.workdir (params only, verified).
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
from lmos_jax.train.checkpoint import (CheckpointReadError, abandoned_reads_quiet,
                                       without_absl_warnings)
from lmos_jax.workdir import (checkpoint_steps, step_dir, CONFIG, LABELS, PARAMS, TOKENIZER, CheckpointError,
                              checkpoint_params, fingerprint, fingerprint_mismatch, int_keys,
                              restore_tree)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "keep": None}
EXPORT_INFO = "export.json"


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
  if (out / PARAMS).exists():
    raise UserError(f"--out={out}: {out / PARAMS} exists; pass a new --out directory (an "
                    "export is never overwritten)")
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  try:  # orbax's notes on the item-level metadata a trainer checkpoint does not keep: noise
    with abandoned_reads_quiet(), without_absl_warnings("Metadata file does not exist",
                                                        "Failed to get item metadata"):
      step, params, meta = checkpoint_params(workdir, step, sharding)
  except (UserError, CheckpointError):
    raise
  except Exception as e:  # noqa: BLE001 - any read failure: this step is unusable
    where = step_dir(workdir, step if step is not None else checkpoint_steps(workdir)[-1])
    raise CheckpointReadError(f"checkpoint {where} cannot be read, it is corrupt or truncated "
                              f"({type(e).__name__}: {str(e)[:200]}); export an earlier "
                              f"--step (steps: {checkpoint_steps(workdir)})") from None
  params = cast_params(params, DTYPES[dtype])
  out.mkdir(parents=True, exist_ok=True)
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(out / PARAMS, args=ocp.args.PyTreeSave(params))
  if "config" in meta:
    (out / CONFIG).write_text(json.dumps(json.loads(meta["config"]), indent=2))
  for name in (TOKENIZER, LABELS):
    if (workdir / name).exists():
      shutil.copy(workdir / name, out / name)
  info = {"source": str(workdir), "step": step, "dtype": dtype,
          "fingerprint": fingerprint(params), "versions": meta.get("versions", {})}
  (out / EXPORT_INFO).write_text(json.dumps(info, indent=2))
  return out


def load_export(export_dir: str | Path, sharding=None) -> Any:
  """Params of an export, onto `sharding` (a pytree of shardings or one; default: device 0),
  checked against export.json's fingerprint."""
  export_dir = Path(export_dir).absolute()
  params = int_keys(restore_tree(export_dir / PARAMS,
                                 sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])))
  info_path = export_dir / EXPORT_INFO
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
