"""The run directory: one owner for what a workdir holds and how it is read back.

A workdir holds `config.json` (the run's config), `tokenizer.json` (the tokenizer as
`describe()` records it), `labels.json` (a classifier's label names in id order) and
`checkpoints/STEP/{state,meta}` (orbax train states and their JSON record); a PEFT run adds
`adapters.safetensors`, `lmos compress` adds `compress/VARIANT.safetensors`, and
`lmos convert --from-hf` writes `params/`, `hf_config.json` and `hf_tokenizer/` instead of
checkpoints; a run written by `lmos compress --method` holds `params.safetensors` (int8/int4
codes or sparse kernels, as stored) in their place. `metrics.jsonl`, `tb/` and `wall_time.jsonl` are training's logs. Generate,
predict, compress, convert and export read a run only through this module, so none of them
rebuilds the data pipeline (or needs the training text) to load one.

orbax is imported inside the functions that read or write checkpoints: its import is about
0.15 s of a fresh `lmos train`'s start-up on a 2-core host, which needs none before its
first save.

Why params are read partially: a train state also holds the optimizer moments (2x the params
for Adam); inference needs only `params`, so only that subtree is read, and it is checked
against the fingerprint saved with the step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lmos_jax.config.schema import base_config
from lmos_jax.errors import UserError
from lmos_jax.models.quantized import embedding_shape, is_qarray

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
LABELS = "labels.json"
ITEMS = "items.json"  # task rec: the item catalogue (ids, texts, training counts)
CHECKPOINTS = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"  # bad steps are moved here, never deleted
STATE_ITEM = "state"  # the orbax item of a step holding {step, params, opt_state, rng}
META_ITEM = "meta"  # the JSON item: config, step, tokens seen, versions, fingerprint
ADAPTERS = "adapters.safetensors"
COMPRESSED = "compress"
PARAMS = "params"  # params-only orbax tree (lmos convert --from-hf, lmos export)
COMPRESSED_PARAMS = "params.safetensors"  # lmos compress --method: weights as stored
HF_CONFIG = "hf_config.json"
HF_TOKENIZER = "hf_tokenizer"
WALL_TIME = "wall_time.jsonl"  # one row per `lmos train` invocation: where its wall time went
# What makes a directory a run: `lmos convert --from-hf` refuses to write over any of these.
RUN_FILES = (CONFIG, TOKENIZER, LABELS, ITEMS, CHECKPOINTS, ADAPTERS, PARAMS, COMPRESSED_PARAMS,
             HF_CONFIG, HF_TOKENIZER)


class CheckpointError(RuntimeError):
  """A checkpoint cannot be written or read; the message names the path and what to do."""


# ---------------------------------------------------------------- config


def merge_config(base: ml_collections.ConfigDict, saved: dict) -> ml_collections.ConfigDict:
  """The saved config over `base`: keys added to the schema since the run keep defaults."""
  for key, value in saved.items():
    if key in base and isinstance(value, dict) and isinstance(base[key],
                                                              ml_collections.ConfigDict):
      merge_config(base[key], value)
    else:
      base[key] = value
  return base


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """WORKDIR/config.json merged over today's `base_config()`."""
  path = Path(workdir) / CONFIG
  if not path.is_file():
    raise UserError(f"--workdir {workdir}: no {CONFIG}; run `lmos train` or "
                    "`lmos convert --from-hf` into it first")
  try:
    saved = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON ({e})") from None
  return merge_config(base_config(), saved)


def write_config(workdir: str | Path, cfg: ml_collections.ConfigDict) -> Path:
  path = Path(workdir) / CONFIG
  path.write_text(cfg.to_json(indent=2))
  return path


# ---------------------------------------------------------------- tokenizer and labels


def tokenizer_info(tok) -> dict:
  """What `read_tokenizer` needs to rebuild `tok`: its `describe()`, plus a flag when MLM
  appended a [MASK] id after the vocabulary (data.encoder.MaskedTokenizer)."""
  from lmos_jax.data.encoder import MaskedTokenizer
  if isinstance(tok, MaskedTokenizer):
    return {**tokenizer_info(tok.base), "append_mask": True}
  return tok.describe()


def write_tokenizer(workdir: str | Path, tok) -> Path:
  path = Path(workdir) / TOKENIZER
  path.write_text(json.dumps(tokenizer_info(tok)))
  return path


def read_tokenizer(workdir: str | Path):
  """The run's tokenizer: WORKDIR/tokenizer.json, else (a `lmos convert --from-hf` workdir)
  the Hugging Face tokenizer copied into hf_tokenizer/."""
  from lmos_jax.data.encoder import MaskedTokenizer
  from lmos_jax.data.tokenizer import load_pretrained, tokenizer_from_info
  wd = Path(workdir)
  path = wd / TOKENIZER
  if path.is_file():
    info = json.loads(path.read_text())
    try:
      tok = tokenizer_from_info(info)
    except ValueError as e:
      raise UserError(f"{path}: {e}") from None
    return MaskedTokenizer(tok) if info.get("append_mask") else tok
  if (wd / HF_TOKENIZER / "tokenizer.json").is_file():
    return load_pretrained(str(wd / HF_TOKENIZER))
  raise UserError(f"--workdir {workdir}: no {TOKENIZER} (nor {HF_TOKENIZER}/tokenizer.json); "
                  "it is written by `lmos train` and `lmos convert --from-hf`")


def write_labels(workdir: str | Path, names) -> Path:
  path = Path(workdir) / LABELS
  path.write_text(json.dumps([str(n) for n in names]))
  return path


def label_names(workdir: str | Path) -> list[str]:
  """A classifier's label names in id order: labels.json (written by `lmos train`), else the
  id2label of the Hugging Face config a `lmos convert --from-hf` workdir came from."""
  wd = Path(workdir)
  if (wd / LABELS).is_file():
    return [str(n) for n in json.loads((wd / LABELS).read_text())]
  if (wd / HF_CONFIG).is_file():
    id2label = json.loads((wd / HF_CONFIG).read_text()).get("id2label") or {}
    if id2label:
      return [str(id2label[k]) for k in sorted(id2label, key=int)]
  raise UserError(f"--workdir {workdir}: no {LABELS}; it is written when `lmos train` "
                  "finetunes a classifier (config task='cls')")


def write_items(workdir: str | Path, catalogue) -> Path:
  path = Path(workdir) / ITEMS
  path.write_text(json.dumps(catalogue.describe()))
  return path


def read_items(workdir: str | Path):
  """A recommender's item catalogue (data.interactions.Catalogue), as `lmos train` saw it."""
  from lmos_jax.data.interactions import Catalogue
  path = Path(workdir) / ITEMS
  if not path.is_file():
    raise UserError(f"--workdir {workdir}: no {ITEMS}; it is written when `lmos train` "
                    "trains a recommender (config task='rec')")
  try:
    return Catalogue.from_info(json.loads(path.read_text()))
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path}: not an item catalogue ({e}); retrain or restore the file") from None


# ---------------------------------------------------------------- the model


def model_layout(cfg: ml_collections.ConfigDict, vocab_size: int) -> tuple[Any, dict]:
  """(graphdef, abstract params) of the run's model as `lmos train` built it (PEFT wrapping
  included, so a checkpoint's tree fits), allocating nothing."""
  from flax import nnx
  from lmos_jax.models.factory import model_factory
  from lmos_jax.peft.methods import wrap_factory
  make = wrap_factory(model_factory(cfg.model, vocab_size), cfg.peft)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  return graphdef, nnx.to_pure_dict(state)


def check_params_fit(abstract: Any, params: Any, where: str) -> None:
  """Every param of the model exists in `params` with its shape; the first that does not is
  named (a config.json or tokenizer.json that does not match the saved weights)."""
  from lmos_jax.tree import path_str
  want = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(
      abstract)[0]}
  def shape(name: str, x) -> tuple:
    # a QArray has the shape of the kernel it stands for, the embedding that of the table
    return embedding_shape(x) if name == "embed" else tuple(np.shape(x))
  got = {path_str(p): shape(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=is_qarray)[0]}
  for name in sorted(set(want) | set(got)):
    if want.get(name) != got.get(name):
      raise UserError(f"{where}: param {name!r} has shape {got.get(name, 'missing')} but the "
                      f"model of {CONFIG} and {TOKENIZER} expects {want.get(name, 'none')}")


# ---------------------------------------------------------------- fingerprints


def _leaf_hash(x: jax.Array) -> jax.Array:
  """Position-weighted wrapping sum of the raw bits: independent of sharding and mesh."""
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  elif x.dtype.itemsize == 1:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  else:  # 8-byte leaves: hash both halves
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  flat = bits.reshape(-1)
  weights = jnp.arange(flat.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.sum(flat * weights, dtype=jnp.uint32)


def fingerprint(state: Any) -> dict[str, int]:
  """{tree path: uint32 hash} for every array leaf, computed where the arrays live."""
  hashes = jax.jit(lambda s: jax.tree.map(_leaf_hash, s))(state)
  flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(hashes))
  return {jax.tree_util.keystr(p): int(v) for p, v in flat}


def fingerprint_mismatch(expected: dict[str, int], state: Any) -> list[str]:
  """Paths whose restored content does not hash to what was saved (empty: intact)."""
  got = fingerprint(state)
  return sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))


def subtree_fingerprint(expected: dict[str, int], key: str) -> dict[str, int]:
  """The part of a whole-state fingerprint under `key`, with paths relative to it."""
  prefix = f"['{key}']"
  return {k[len(prefix):]: v for k, v in expected.items() if k.startswith(prefix)}


# ---------------------------------------------------------------- checkpoints


def checkpoint_dir(workdir: str | Path) -> Path:
  return Path(workdir).absolute() / CHECKPOINTS


def step_dir(workdir: str | Path, step: int) -> Path:
  return checkpoint_dir(workdir) / str(int(step))


def has_entries(directory: Path) -> bool:
  """Whether `directory` exists and holds anything: where nothing was saved, that is known
  without importing orbax."""
  return directory.is_dir() and any(directory.iterdir())


def checkpoint_steps(workdir: str | Path) -> list[int]:
  """Finalized checkpoint steps, oldest first (half-written `*.orbax-checkpoint-tmp*` are
  never listed)."""
  d = checkpoint_dir(workdir)
  if not has_entries(d):
    return []
  import orbax.checkpoint as ocp
  return sorted(ocp.utils.checkpoint_steps(d))


def read_meta(workdir: str | Path, step: int) -> dict:
  """The JSON record saved with a step (config, step, versions, fingerprint, ...)."""
  import orbax.checkpoint as ocp
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
      step_dir(workdir, step) / META_ITEM)


@contextlib.contextmanager
def without_absl_warnings(*prefixes: str):
  """Drops the absl log records (orbax logs through absl) whose message starts with one of
  `prefixes`, for the duration of the block; every other record passes."""
  logger = logging.getLogger("absl")
  drop = logging.Filter()
  drop.filter = lambda record: not record.getMessage().startswith(prefixes)
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


# orbax's notes on the item-level metadata a trainer checkpoint does not keep: noise beside
# the one line an lmos command prints
METADATA_NOISE = ("Metadata file does not exist", "Failed to get item metadata")


def _tree_metadata(item_dir: Path) -> Any:
  import orbax.checkpoint as ocp
  with without_absl_warnings(*METADATA_NOISE):
    meta = ocp.PyTreeCheckpointer().metadata(item_dir)
  tree = getattr(meta, "item_metadata", meta)
  return getattr(tree, "tree", tree)


def _restore_args(tree_meta: Any, sharding) -> tuple[Any, Any]:
  """(item, restore_args) reading every leaf of `tree_meta` as host numpy (sharding None),
  onto one sharding, or onto a matching pytree of shardings."""
  import orbax.checkpoint as ocp
  if sharding is None:
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree_meta)
    return abstract, jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree_meta)
  if isinstance(sharding, jax.sharding.Sharding):
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                            tree_meta)
  else:  # the model's tree spells layer indices as ints, orbax's as strings
    abstract = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                            tree_meta, str_keys(sharding))
  return abstract, ocp.checkpoint_utils.construct_restore_args(abstract)


def restore_subtree(item_dir: Path, key: str, sharding=None) -> Any:
  """Only `key` (e.g. params) of a saved state tree; the other subtrees are never read.

  sharding: None reads host numpy; a Sharding (or a pytree of them) places the arrays.
  """
  import orbax.checkpoint as ocp
  tree = _tree_metadata(item_dir)
  if key not in tree:
    raise CheckpointError(f"{item_dir} has no {key!r} subtree (it holds {sorted(tree)})")
  item, args = _restore_args(tree[key], sharding)
  with without_absl_warnings(*METADATA_NOISE):
    restored = ocp.PyTreeCheckpointer().restore(
        item_dir, args=ocp.args.PyTreeRestore(item={key: item}, restore_args={key: args},
                                              partial_restore=True))
  return restored[key]


def restore_tree(item_dir: Path, sharding=None) -> Any:
  """A whole orbax pytree (e.g. params/) as host numpy or onto `sharding`."""
  import orbax.checkpoint as ocp
  item, args = _restore_args(_tree_metadata(item_dir), sharding)
  return ocp.PyTreeCheckpointer().restore(
      item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args))


def restore_numpy(path: Path) -> Any:
  """An orbax pytree read back as numpy arrays, with no device placement."""
  return restore_tree(Path(path))


def checkpoint_params(workdir: str | Path, step: int | None = None, sharding=None
                      ) -> tuple[int, Any, dict]:
  """(step, params, meta) of a trainer checkpoint (default: the newest), read partially and
  checked against the fingerprint saved with it. sharding None: host numpy."""
  steps = checkpoint_steps(workdir)
  where = checkpoint_dir(workdir)
  if not steps:
    raise UserError(f"no checkpoint under {where}; train first or pass the right --workdir")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise UserError(f"--step={step}: {where} has steps {steps}")
  meta = read_meta(workdir, step)
  # int layer keys before hashing: the trainer fingerprinted its state with them, and orbax
  # gives unscanned layers back as '0', '1'... (a different tree path, not different data)
  params = int_keys(restore_subtree(step_dir(workdir, step) / STATE_ITEM, "params", sharding))
  expected = subtree_fingerprint(meta.get("fingerprint", {}), "params")
  bad = fingerprint_mismatch(expected, params) if expected else []
  if bad:
    raise CheckpointError(f"checkpoint {step_dir(workdir, step)} is corrupt ({', '.join(bad[:3])} "
                          "differ from the saved fingerprint); use an earlier step")
  return step, params, meta


def latest_params(workdir: str | Path, sharding=None) -> Any:
  """The run's latest params with int layer keys: the newest trainer checkpoint (params only,
  verified), else the params/ that `lmos convert --from-hf` wrote.

  sharding: None puts them on the first device; or a Sharding, or a pytree of them.
  """
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return _latest(workdir, sharding)


def workdir_params(workdir: str | Path) -> dict:
  """`latest_params` as host numpy (no device placement), int layer keys."""
  return _latest(workdir, None)


def _latest(workdir: str | Path, sharding) -> Any:
  wd = Path(workdir).absolute()
  if checkpoint_steps(wd):
    return checkpoint_params(wd, sharding=sharding)[1]
  if (wd / PARAMS).is_dir():
    return int_keys(restore_tree(wd / PARAMS, sharding))
  if (wd / COMPRESSED_PARAMS).is_file():
    from lmos_jax.compress.store import load_compressed
    params = load_compressed(wd / COMPRESSED_PARAMS)[0]
    return params if sharding is None else jax.device_put(params, sharding)
  raise UserError(f"--workdir {workdir}: no {CHECKPOINTS}/, {PARAMS}/ or {COMPRESSED_PARAMS} "
                  "to read; run `lmos train` or `lmos convert --from-hf` into it first")


def int_keys(tree):
  """Orbax stores dict keys as strings; unscanned layer indices come back as '0', '1'..."""
  if isinstance(tree, dict):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): int_keys(v)
            for k, v in tree.items()}
  return tree


def str_keys(tree):
  """The inverse of `int_keys`: dict keys as orbax stores them."""
  if isinstance(tree, dict):
    return {str(k): str_keys(v) for k, v in tree.items()}
  return tree


def compressed_params(workdir: str | Path, variant: str) -> tuple[dict, dict]:
  """(params as stored, extra metadata) of `lmos compress`'s WORKDIR/compress/VARIANT; int8
  and int4 kernels stay quantized (QArray), pruned ones come back dense."""
  from lmos_jax.compress.store import load_compressed
  path = Path(workdir) / COMPRESSED / f"{variant}.safetensors"
  if not path.is_file():
    have = sorted(p.stem for p in path.parent.glob("*.safetensors"))
    raise UserError(f"{path}: no such compressed variant (have: {have or 'none'}); run "
                    f"`lmos compress --workdir {workdir} --recipe {variant}` first")
  return load_compressed(path)


def write_params_run(workdir: str | Path, cfg: ml_collections.ConfigDict, tok, params: Any
                     ) -> Path:
  """A params-only run (config.json, tokenizer.json, params/) that `latest_params` reads like
  an export: e.g. a trimmed model to draft for its source in speculative decoding. Refuses a
  directory that already holds run files."""
  import orbax.checkpoint as ocp
  wd = Path(workdir).absolute()
  if existing_run_files(wd):
    raise UserError(f"{wd} already holds {', '.join(existing_run_files(wd))}; pick a new "
                    "directory (a run is never overwritten)")
  wd.mkdir(parents=True, exist_ok=True)
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(wd / PARAMS, args=ocp.args.PyTreeSave(str_keys(jax.device_get(params))))
  write_config(wd, cfg)
  write_tokenizer(wd, tok)
  return wd


# ---------------------------------------------------------------- writing over a run


def existing_run_files(workdir: str | Path) -> list[str]:
  """The run files (RUN_FILES) already in `workdir`."""
  wd = Path(workdir)
  return [n for n in RUN_FILES if (wd / n).exists()]


def set_aside(workdir: str | Path, names: list[str]) -> Path:
  """Moves `names` into WORKDIR/replaced-TIMESTAMP/ (never deletes them); returns that dir."""
  wd = Path(workdir)
  stamp = time.strftime("%Y%m%dT%H%M%S")
  dest, n = wd / f"replaced-{stamp}", 1
  while dest.exists():
    n += 1
    dest = wd / f"replaced-{stamp}-{n}"
  dest.mkdir(parents=True)
  for name in names:
    shutil.move(str(wd / name), str(dest / name))
  return dest
