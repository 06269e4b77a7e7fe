"""Train step: sharded == single device, grad accumulation == full batch, overfitting,
weight-decay mask, L2, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from lmos_jax.models.factory import model_factory
from lmos_jax.parallel.sharding import make_mesh
from lmos_jax.train.losses import lm_loss
from lmos_jax.train.optim import decay_mask_fn, make_optimizer, make_schedule
from lmos_jax.tree import path_names
from lmos_jax.train.precision import resolve_policy
from lmos_jax.train.step import StepConfig, init_train_state, jit_train_step

VOCAB = 64


def _cfg(**train):
  c = tiny_config(**train)
  m = c.model
  m.pos_emb, m.norm, m.mlp, m.num_kv_heads, m.tie_embeddings = "rope", "rmsnorm", "swiglu", 2, False
  m.d_model, m.num_heads = 64, 4
  return c


def _batch(n=16, t=16, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, VOCAB, size=(n, t + 1)).astype(np.int32)
  return {"inputs": x[:, :-1], "targets": x[:, 1:]}


def _run(cfg, mesh_shape, steps=2, batch=None, devices=None, flat_allreduce=True, hlo=None):
  devices = devices if devices is not None else jax.devices()
  mesh = make_mesh(mesh_shape, devices)
  tx = make_optimizer(cfg.train)
  graphdef, state, shardings = init_train_state(model_factory(cfg.model, VOCAB), tx,
                                                resolve_policy("fp32"), mesh, seed=0)
  scfg = StepConfig(graphdef=graphdef, tx=tx, loss_fn=lm_loss, policy=resolve_policy("fp32"),
                    microbatches=cfg.train.microbatches, l2=cfg.train.l2,
                    schedule=make_schedule(cfg.train))
  batch = batch or _batch()
  step = jit_train_step(scfg, shardings, mesh, {k: v.ndim for k, v in batch.items()},
                        flat_allreduce=flat_allreduce)
  losses = []
  with jax.set_mesh(mesh):
    if hlo is not None:
      hlo.append(step.lower(state, batch).compile().as_text())
    for _ in range(steps):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state["params"])


def _assert_close(a, b, atol):
  for (p, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                            jax.tree_util.tree_flatten_with_path(b)[0]):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=str(path_names(p)))


@pytest.fixture(scope="module")
def single_device():
  return _run(_cfg(), (1, 1, 1), devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_equals_single_device(single_device, mesh_shape):
  # Tolerance: f32 reductions are reassociated across shards (~1e-6 relative). Adam's
  # g/sqrt(v) maps that noise on near-zero gradients onto updates of up to lr (3e-3) in the
  # worst element, so params are compared at 1e-4 (3% of one step); a sharding bug moves
  # whole tensors by ~lr and changes the second loss beyond rtol 1e-5.
  losses, params = _run(_cfg(), mesh_shape)
  np.testing.assert_allclose(losses, single_device[0], rtol=1e-5)
  _assert_close(params, single_device[1], atol=1e-4)


def test_grad_accumulation_equals_full_batch(single_device):
  losses, params = _run(_cfg(microbatches=4), (1, 1, 1), devices=jax.devices()[:1])
  np.testing.assert_allclose(losses, single_device[0], rtol=1e-5)
  _assert_close(params, single_device[1], atol=1e-4)  # same reasoning as above


def test_grad_accumulation_sharded():
  ref = _run(_cfg(microbatches=1), (2, 2, 2))
  acc = _run(_cfg(microbatches=2), (2, 2, 2))
  np.testing.assert_allclose(acc[0], ref[0], rtol=1e-5)
  _assert_close(acc[1], ref[1], atol=1e-4)


def _all_reduce_operands(hlo_text):
  import re
  """The result shape of each all-reduce in compiled HLO text (a tuple when combined)."""
  return re.findall(r"= ([^=\n]+?) all-reduce(?:-start)?\(", hlo_text)


@pytest.mark.parametrize("microbatches", [1, 2])
def test_flat_allreduce_on_a_cpu_data_mesh(single_device, microbatches):
  """Data-only CPU meshes sum grads with one all-reduce of a flat f32 buffer (instead of one
  rendezvous per leaf); the result equals the single-device run and XLA's own path."""
  hlo_flat, hlo_xla = [], []
  flat = _run(_cfg(microbatches=microbatches), (8, 1, 1), hlo=hlo_flat)
  xla = _run(_cfg(microbatches=microbatches), (8, 1, 1), flat_allreduce=False, hlo=hlo_xla)
  ops = _all_reduce_operands(hlo_flat[0])
  assert len(ops) == 1 and ops[0].startswith("f32[") and "," not in ops[0], ops
  xla_ops = _all_reduce_operands(hlo_xla[0])
  assert xla_ops and xla_ops != ops, xla_ops  # XLA's path: per-leaf shapes (maybe a tuple)
  np.testing.assert_allclose(flat[0], single_device[0], rtol=1e-5)
  np.testing.assert_allclose(flat[0], xla[0], rtol=1e-5)
  _assert_close(flat[1], single_device[1], atol=1e-4)  # tolerance: see the test above
  _assert_close(flat[1], xla[1], atol=1e-4)


def test_tiny_model_overfits_one_batch():
  cfg = _cfg(lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.0)
  batch = _batch(n=8)
  losses, _ = _run(cfg, (1, 1, 1), steps=60, batch=batch, devices=jax.devices()[:1])
  assert losses[0] > 3.5  # ~ln(64) = 4.16 at init
  assert losses[-1] < 0.5, losses[-10:]  # memorised: well below the uniform 4.16


def test_decay_mask():
  params = {"embed": 1.0, "pos_embed": 1.0, "final_norm": {"scale": 1.0, "bias": 1.0},
            "blocks": {"attn": {"query": {"kernel": 1.0, "bias": 1.0}}}}
  mask = decay_mask_fn(False, False)(params)
  assert mask == {"embed": False, "pos_embed": False,
                  "final_norm": {"scale": False, "bias": False},
                  "blocks": {"attn": {"query": {"kernel": True, "bias": False}}}}
  mask = decay_mask_fn(True, True)(params)
  assert all(jax.tree.leaves(mask))


def test_weight_decay_only_touches_masked_params():
  cfg = _cfg(lr=1e-2, weight_decay=0.5, schedule="constant", warmup_steps=0, grad_clip=0.0)
  tx = make_optimizer(cfg.train)
  params = {"embed": jnp.ones((4, 4)), "blocks": {"mlp": {"up": {"kernel": jnp.ones((4, 4)),
                                                                   "bias": jnp.ones((4,))}}}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.abs(updates["embed"]).max()) == 0.0
  assert float(jnp.abs(updates["blocks"]["mlp"]["up"]["bias"]).max()) == 0.0
  np.testing.assert_allclose(updates["blocks"]["mlp"]["up"]["kernel"], -1e-2 * 0.5)


def test_l2_penalty_adds_to_loss():
  base = _run(_cfg(), (1, 1, 1), steps=1, devices=jax.devices()[:1])[0][0]
  with_l2 = _run(_cfg(l2=1e-2), (1, 1, 1), steps=1, devices=jax.devices()[:1])[0][0]
  assert with_l2 > base + 1e-4


@pytest.mark.parametrize("kind", ["constant", "warmup_cosine", "warmup_linear", "rsqrt", "wsd"])
def test_schedules(kind):
  c = _cfg(schedule=kind, lr=1.0, warmup_steps=10, steps=100, min_lr_ratio=0.1,
           decay_fraction=0.2)
  s = make_schedule(c.train)
  assert float(s(0)) == pytest.approx(0.0, abs=1e-6)
  assert float(s(5)) == pytest.approx(0.5, rel=1e-5)
  assert float(s(10)) == pytest.approx(1.0, rel=1e-5)
  end = float(s(100))
  expected_end = {"constant": 1.0, "warmup_cosine": 0.1, "warmup_linear": 0.1,
                  "rsqrt": (10 / 100) ** 0.5, "wsd": 0.1}[kind]
  assert end == pytest.approx(expected_end, rel=1e-4)
  if kind == "wsd":
    assert float(s(79)) == pytest.approx(1.0)  # stable until the last 20% of steps
    assert float(s(90)) == pytest.approx(0.55, rel=1e-4)


def test_precision_policies():
  assert resolve_policy("auto", "cpu").name == "fp32"
  assert resolve_policy("auto", "gpu").name == "bf16"
  p = resolve_policy("bf16")
  assert p.param_dtype == jnp.float32 and p.compute_dtype == jnp.bfloat16
  assert resolve_policy("bf16_full").param_dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="train.precision"):
    resolve_policy("fp8")


def test_bf16_policy_keeps_fp32_master_weights_and_loss():
  cfg = _cfg()
  mesh = make_mesh((1, 1, 1), jax.devices()[:1])
  tx = make_optimizer(cfg.train)
  policy = resolve_policy("bf16")
  graphdef, state, shardings = init_train_state(model_factory(cfg.model, VOCAB), tx, policy,
                                                mesh, seed=0)
  scfg = StepConfig(graphdef=graphdef, tx=tx, loss_fn=lm_loss, policy=policy)
  batch = _batch()
  step = jit_train_step(scfg, shardings, mesh, {k: v.ndim for k, v in batch.items()})
  with jax.set_mesh(mesh):
    state, metrics = step(state, batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
  assert metrics["loss"].dtype == jnp.float32
  assert 3.0 < float(metrics["loss"]) < 5.5
