"""Layer trimming: drop chosen layers, or the block whose removal changes hidden states least.

The block choice follows Gromov et al. (2024), "The Unreasonable Ineffectiveness of the
Deeper Layers": for n layers starting at l, the angular distance arccos(cos(h_l, h_{l+n}))/π
between the residual stream entering layer l and leaving layer l+n-1, averaged over the
tokens of a calibration batch; the block with the smallest distance is dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array


def drop_layers(graphdef, params: dict, drop: Sequence[int]):
  """(graphdef, params) of the same model without layers `drop` (scan or unrolled)."""
  model = nnx.merge(graphdef, params)
  cfg = model.cfg
  drop = sorted(set(int(i) for i in drop))
  bad = [i for i in drop if not 0 <= i < cfg.num_layers]
  if bad or len(drop) >= cfg.num_layers:
    raise ValueError(f"drop={drop}: layer indices must lie in [0, {cfg.num_layers}) and "
                     f"leave at least one layer")
  keep = [i for i in range(cfg.num_layers) if i not in drop]
  if cfg.scan_layers:
    idx = np.asarray(keep)
    blocks = jax.tree.map(lambda x: x[idx], params["blocks"])
  else:
    blocks = {new: params["blocks"][old] for new, old in enumerate(keep)}
  new_cfg = dataclasses.replace(cfg, num_layers=len(keep))
  new_graphdef, _ = nnx.split(nnx.eval_shape(lambda: type(model)(new_cfg,
                                                                 rngs=nnx.Rngs(0))))
  return new_graphdef, {**params, "blocks": blocks}


def hidden_states(graphdef, params: dict, tokens_BT: Array) -> Array:
  """Residual stream before layer 0, after layer 0, ..., after the last: (L+1, B, T, D)."""
  model = nnx.merge(graphdef, params)
  b, t = tokens_BT.shape
  pos_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
  x = model.embed_tokens(tokens_BT, pos_BT, model.dtype)
  outs = [x]
  if model.cfg.scan_layers:
    gd, st = nnx.split(model.blocks)
    blocks = [nnx.merge(gd, jax.tree.map(lambda a, i=i: a[i], st))
              for i in range(model.cfg.num_layers)]
  else:
    blocks = list(model.blocks)
  for block in blocks:
    x = block(x, pos_BT, None, is_causal=True)
    outs.append(x)
  return jnp.stack(outs)


def angular_distances(h_LBTD: Array, n: int) -> np.ndarray:
  """Mean angular distance (in [0, 1]) between h_l and h_{l+n}, for every start l."""
  h = h_LBTD.astype(jnp.float32)
  a, b = h[:-n], h[n:]
  cos = (a * b).sum(-1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-9)
  return np.asarray(jnp.arccos(jnp.clip(cos, -1.0, 1.0)).mean(axis=(1, 2)) / jnp.pi)


def least_important_block(graphdef, params: dict, tokens_BT: Array, n: int):
  """(start layer, distances per start) of the n-layer block to drop."""
  h = jax.jit(lambda p, t: hidden_states(graphdef, p, t))(params, tokens_BT)
  d = angular_distances(h, n)
  return int(np.argmin(d)), d
