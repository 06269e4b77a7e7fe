"""Starting a training run from pretrained weights (`model.init_from`).

The source is a Hugging Face model folder or an lmos workdir (the latest params of a run,
e.g. an MLM pretraining to finetune as a classifier). Heads the run needs that the source
lacks (a BERT pooler or classifier) start fresh; heads the source holds that the run has no
place for (an MLM head under a classifier) are dropped; one line says which. Every other
param must be in the source with the run's shape, else a UserError names it.
"""

from __future__ import annotations

import jax
import numpy as np

from lmos_jax.config.loading import init_from_kind
from lmos_jax.errors import UserError
from lmos_jax.models.hf import hf_params_for
from lmos_jax.tree import path_str

# Top-level params of BERT's heads, and how the account line names them.
HEAD_PARAMS = {"pooler": "pooler", "classifier": "classifier", "mlm_dense": "mlm head",
               "mlm_norm": "mlm head", "mlm_bias": "mlm head"}


def pretrained_train_state(cfg, state: dict, shardings: dict, tx, mesh) -> dict:
  """A fresh train state with `model.init_from`'s weights put into its params.

  Params the source does not hold and no head rule covers (PEFT adapters) keep the fresh
  state's values. Optimizer state is re-initialised from the loaded params, in its
  shardings.
  """
  vocab_size = int(state["params"]["embed"].shape[0])
  loaded, note = init_from_params(cfg, vocab_size)
  if note and jax.process_index() == 0:
    print(f"lmos train: {note}", flush=True)
  flat_loaded = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}

  def pick(path, cur, sh):
    x = flat_loaded.pop(path_str(path), None)
    if x is None:
      return cur
    if tuple(x.shape) != tuple(cur.shape):
      raise UserError(f"model.init_from: param {path_str(path)} has shape {tuple(x.shape)} "
                      f"in {cfg.model.init_from} but the run's model needs {tuple(cur.shape)}")
    return jax.device_put(np.asarray(x, cur.dtype), sh)

  params = jax.tree_util.tree_map_with_path(pick, state["params"], shardings["params"])
  if flat_loaded:
    raise UserError(f"model.init_from: {sorted(flat_loaded)[:5]} have no place in the run's "
                    "model; does the config match the checkpoint?")
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
  return {**state, "params": params, "opt_state": opt_state}


def init_from_params(cfg, vocab_size: int) -> tuple[dict, str]:
  """Host (numpy) params of the run's model, PEFT layers aside, from `model.init_from`, and
  the one-line account of the heads started fresh or dropped ('' when none)."""
  src = cfg.model.init_from
  if init_from_kind(src) == "hf":
    params, fresh, dropped = hf_params_for(cfg.model, src, vocab_size, cfg.seed)
  else:
    params, fresh, dropped = workdir_params_for(cfg, src, vocab_size)
  return params, head_note(src, fresh, dropped)


def head_note(src: str, fresh: list[str], dropped: list[str]) -> str:
  """'init_from SRC: fresh pooler, classifier; dropped mlm head' ('' when nothing changed)."""
  parts = ([f"fresh {', '.join(fresh)}"] if fresh else []) + (
      [f"dropped {', '.join(dropped)}"] if dropped else [])
  return f"init_from {src}: {'; '.join(parts)}" if parts else ""


def workdir_params_for(cfg, workdir: str, vocab_size: int
                       ) -> tuple[dict, list[str], list[str]]:
  """(params of the run's model from an lmos workdir's latest params, fresh heads, dropped
  heads). A PEFT source is merged into its base weights first; layer stacking (scan or
  not) is converted to the run's."""
  from flax import nnx

  from lmos_jax.models.bert import FRESH_HEADS
  from lmos_jax.models.factory import model_factory
  from lmos_jax.peft.methods import merged_params
  from lmos_jax.workdir import int_keys, read_config, workdir_params

  source_cfg = read_config(workdir)
  source = int_keys(workdir_params(workdir))
  if source_cfg.get("peft") and source_cfg.peft.method != "full":
    source_vocab = int(np.asarray(source["embed"]).shape[0])
    source = merged_params(model_factory(source_cfg.model, source_vocab), source_cfg.peft,
                           jax.tree.map(np.asarray, source))
    source = jax.tree.map(np.asarray, source)
  model = nnx.eval_shape(lambda: model_factory(cfg.model, vocab_size)(nnx.Rngs(0)))
  target = nnx.to_pure_dict(nnx.split(model)[1])
  if "blocks" in source and "blocks" in target:
    source = {**source, "blocks": restack_blocks(source["blocks"], cfg.model.scan_layers,
                                                 cfg.model.num_layers)}
  fresh = [h for h in FRESH_HEADS if h in target and h not in source]
  dropped = sorted({HEAD_PARAMS[k] for k in source if k not in target and k in HEAD_PARAMS})
  init = fresh_values(cfg, vocab_size, fresh)
  flat_src = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(
      {k: v for k, v in source.items() if k not in HEAD_PARAMS or k in target})[0]}
  flat_init = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(init)[0]}

  def fill(path, want):
    key = path_str(path)
    if key in flat_init:
      return flat_init[key]
    if key not in flat_src:
      raise UserError(f"config 'model.init_from'={workdir!r}: the source has no param {key} "
                      f"(shape {tuple(want.shape)}) the run's model needs; does the config "
                      "match the source run?")
    x = np.asarray(flat_src.pop(key))
    if tuple(x.shape) != tuple(want.shape):
      raise UserError(f"config 'model.init_from'={workdir!r}: param {key} has shape "
                      f"{tuple(x.shape)} there but the run's model needs {tuple(want.shape)}")
    return x.astype(np.float32)

  params = jax.tree_util.tree_map_with_path(fill, target)
  if flat_src:
    raise UserError(f"config 'model.init_from'={workdir!r}: params {sorted(flat_src)[:5]} "
                    "have no place in the run's model; does the config match the source run?")
  return params, fresh, dropped


def restack_blocks(blocks: dict, scan_layers: bool, num_layers: int) -> dict:
  """Layer params as the run keeps them: stacked on a leading axis (scan) or {i: layer}."""
  unrolled = all(isinstance(k, int) for k in blocks)
  if unrolled == (not scan_layers):
    return blocks
  if scan_layers:
    return jax.tree.map(lambda *xs: np.stack(xs), *[blocks[i] for i in sorted(blocks)])
  return {i: jax.tree.map(lambda x, i=i: np.asarray(x)[i], blocks) for i in range(num_layers)}


def fresh_values(cfg, vocab_size: int, heads: list[str]) -> dict:
  """Fresh BERT heads, drawn on the host from the run's seed (reproducible at load)."""
  if not heads:
    return {}
  from lmos_jax.models.bert import bert_config_from, fresh_heads
  return fresh_heads(bert_config_from(cfg.model, vocab_size), heads, cfg.seed)

