"""Starting a training run from pretrained weights (`model.init_from`)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from lmos_jax.models.hf import HFConversionError, hf_params_from_config


def pretrained_train_state(cfg, state: dict, shardings: dict, tx, mesh) -> dict:
  """A fresh train state with `model.init_from`'s weights put into its params.

  Params the checkpoint does not hold (a new classifier, PEFT adapters) keep their fresh
  values; each loaded tensor must match the run's param shape (error names the path).
  Optimizer state is re-initialised from the loaded params, in its shardings.
  """
  hf_dir = cfg.model.init_from
  if not Path(hf_dir, "config.json").is_file():
    raise HFConversionError(f"config 'model.init_from'={hf_dir!r}: no config.json there; "
                            "give a Hugging Face model folder")
  host = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state["params"])
  loaded = hf_params_from_config(cfg, hf_dir, host, seed=cfg.seed)
  flat_loaded = {jax.tree_util.keystr(p): v for p, v in
                 jax.tree_util.tree_flatten_with_path(loaded)[0]}

  def pick(path, cur, sh):
    key = jax.tree_util.keystr(path)
    if key not in flat_loaded:
      return cur
    x = flat_loaded[key]
    if tuple(x.shape) != tuple(cur.shape):
      raise HFConversionError(f"model.init_from: param {key} has shape {tuple(x.shape)} in "
                              f"{hf_dir} but the run's model needs {tuple(cur.shape)}")
    return jax.device_put(np.asarray(x, cur.dtype), sh)

  params = jax.tree_util.tree_map_with_path(pick, state["params"], shardings["params"])
  unused = set(flat_loaded) - {jax.tree_util.keystr(p) for p, _ in
                               jax.tree_util.tree_flatten_with_path(state["params"])[0]}
  if unused:
    raise HFConversionError(f"model.init_from: {sorted(unused)[:5]} have no place in the run's "
                            "model; does the config match the checkpoint?")
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
  return {**state, "params": params, "opt_state": opt_state}
