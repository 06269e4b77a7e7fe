"""Golden PartitionSpecs under the rules table, fsdp coverage, and optimizer-state sharding."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from helpers import tiny_config
from lmos_jax.models.factory import model_factory
from lmos_jax.parallel.sharding import (logical_to_spec, make_mesh, resolve_mesh_shape,
                                        state_shardings)
from lmos_jax.train.optim import make_optimizer
from lmos_jax.tree import path_names
from lmos_jax.train.precision import resolve_policy
from lmos_jax.train.step import abstract_model_state, init_train_state

# Expected specs on a (data=2, fsdp=2, tensor=2) mesh for the Llama-style options
# (stacked layers: leading 'layers' axis replicated).
GOLDEN_222 = {
    ("embed",): P("tensor", "fsdp"),
    ("lm_head", "kernel"): P("fsdp", "tensor"),
    ("final_norm", "scale"): P(None),
    ("blocks", "attn", "query", "kernel"): P(None, "fsdp", "tensor", None),
    ("blocks", "attn", "key", "kernel"): P(None, "fsdp", "tensor", None),
    ("blocks", "attn", "value", "kernel"): P(None, "fsdp", "tensor", None),
    ("blocks", "attn", "out", "kernel"): P(None, "tensor", None, "fsdp"),
    ("blocks", "mlp", "up", "kernel"): P(None, "fsdp", "tensor"),
    ("blocks", "mlp", "gate", "kernel"): P(None, "fsdp", "tensor"),
    ("blocks", "mlp", "down", "kernel"): P(None, "tensor", "fsdp"),
    ("blocks", "attn_norm", "scale"): P(None, None),
    ("blocks", "mlp_norm", "scale"): P(None, None),
}


def _llama_cfg():
  c = tiny_config()
  m = c.model
  m.pos_emb, m.norm, m.mlp, m.num_kv_heads = "rope", "rmsnorm", "swiglu", 2
  m.tie_embeddings, m.use_bias, m.d_model, m.num_heads = False, False, 64, 4
  return c


def _specs(cfg, mesh_shape):
  mesh = make_mesh(mesh_shape)
  _, abstract = abstract_model_state(model_factory(cfg.model, 64))
  sh = nnx.to_pure_dict(state_shardings(abstract, mesh))
  flat = jax.tree_util.tree_flatten_with_path(sh)[0]
  shapes = dict((path_names(p), x.shape) for p, x in
                jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(abstract))[0])
  return {path_names(p): s.spec for p, s in flat}, shapes


def test_golden_partition_specs():
  specs, _ = _specs(_llama_cfg(), (2, 2, 2))
  assert set(specs) == set(GOLDEN_222)
  for path, spec in GOLDEN_222.items():
    assert specs[path] == spec, path


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 4, 1), (1, 2, 4)])
def test_no_large_param_replicated_under_fsdp(mesh_shape):
  specs, shapes = _specs(_llama_cfg(), mesh_shape)
  for path, spec in specs.items():
    if np.prod(shapes[path]) >= 1024:
      assert any(a is not None for a in spec), f"{path} {shapes[path]} left replicated"


def test_logical_to_spec_rules():
  assert logical_to_spec(("batch", "length"), None, None) == P(("data", "fsdp"), None)
  # an axis that does not divide the dimension is dropped (replicated), never wrong
  assert logical_to_spec(("kv_heads",), (2,), {"data": 1, "fsdp": 1, "tensor": 4}) == P(None)
  with pytest.raises(KeyError, match="no rule"):
    logical_to_spec(("not_a_rule",), None, None)


def test_resolve_mesh_shape():
  assert resolve_mesh_shape(-1, 2, 1, 8) == (4, 2, 1)
  with pytest.raises(ValueError, match="needs 12 devices"):
    resolve_mesh_shape(3, 2, 2, 8)
  with pytest.raises(ValueError, match="at most one"):
    resolve_mesh_shape(-1, -1, 1, 8)


def test_optimizer_state_sharded_like_params():
  cfg = _llama_cfg()
  mesh = make_mesh((1, 4, 2))
  tx = make_optimizer(cfg.train)
  _, state, _ = init_train_state(model_factory(cfg.model, 64), tx, resolve_policy("fp32"),
                                 mesh, 0)
  params = {path_names(p): x.sharding.spec for p, x in
            jax.tree_util.tree_flatten_with_path(state["params"])[0]}
  checked = 0
  for p, x in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]:
    names = path_names(p)
    for i in range(len(names)):
      if names[i:] in params and x.ndim >= 2:
        assert x.sharding.spec == params[names[i:]], names
        if any(a is not None for a in x.sharding.spec):
          assert x.addressable_shards[0].data.size < x.size, f"{names} replicated"
          checked += 1
        break
  assert checked >= 2 * 8  # mu and nu of every matrix
