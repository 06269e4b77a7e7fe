"""Train step: sharded == single device, grad accumulation == full batch, overfitting,
weight-decay mask, L2, dropout only in training, bf16 compute and bf16 matmul operands,
schedules."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import assert_trees_close, leaves_by_path, tiny_config
from lmos_jax.models.factory import model_factory
from lmos_jax.models.layers import kernel_matmul, logits_matmul
from lmos_jax.parallel.sharding import make_mesh
from lmos_jax.train.losses import lm_loss
from lmos_jax.train.optim import decay_mask_fn, make_optimizer, make_schedule
from lmos_jax.train.precision import auto_precision, resolve_policy
from lmos_jax.train.step import (StepConfig, abstract_model_state, eval_step, init_train_state,
                                 jit_train_step, train_step)

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
  assert_trees_close(a, b, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def single_device():
  return _run(_cfg(), (1, 1, 1), devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_equals_single_device(single_device, mesh_shape):
  # Tolerance: f32 reductions are reassociated across shards (~1e-6 relative). Adam's
  # g/sqrt(v) maps that noise onto the update of an element with a near-zero gradient: a
  # gradient k times the noise moves by ~lr/k, up to a flipped sign (2 lr) for k < 1, so no
  # bound below 2 lr per step holds for every element, and the largest deviation grows as the
  # smallest k shrinks (an element 30x above its noise already costs 1e-4). Params are compared
  # at 1e-3 (a third of one step, lr = 3e-3): a sharding bug moves whole tensors by ~lr, and
  # the losses (~4.2; the second sees the first update) must agree to rtol 1e-5 (~80 eps).
  losses, params = _run(_cfg(), mesh_shape)
  np.testing.assert_allclose(losses, single_device[0], rtol=1e-5)
  _assert_close(params, single_device[1], atol=1e-3)


def test_grad_accumulation_equals_full_batch(single_device):
  losses, params = _run(_cfg(microbatches=4), (1, 1, 1), devices=jax.devices()[:1])
  np.testing.assert_allclose(losses, single_device[0], rtol=1e-5)
  _assert_close(params, single_device[1], atol=1e-3)  # same reasoning as above


def test_grad_accumulation_sharded():
  ref = _run(_cfg(microbatches=1), (2, 2, 2))
  acc = _run(_cfg(microbatches=2), (2, 2, 2))
  np.testing.assert_allclose(acc[0], ref[0], rtol=1e-5)  # tolerances: see the sharded test
  _assert_close(acc[1], ref[1], atol=1e-3)


def _all_reduce_operands(hlo_text):
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
  # tolerances: see test_sharded_equals_single_device
  np.testing.assert_allclose(flat[0], single_device[0], rtol=1e-5)
  np.testing.assert_allclose(flat[0], xla[0], rtol=1e-5)
  _assert_close(flat[1], single_device[1], atol=1e-3)
  _assert_close(flat[1], xla[1], atol=1e-3)


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
  # -lr * wd * 1 in f32 is one rounding of 0.005 (<= 2^-24 = 6e-8 relative): the default
  # rtol 1e-7 against the float64 value holds
  np.testing.assert_allclose(updates["blocks"]["mlp"]["up"]["kernel"], -1e-2 * 0.5)


def test_layer_decay_scales_each_layer_and_stacked_equals_unrolled():
  # Adam's first update is -lr * sign(g) per element, so with layer decay each leaf's update
  # is the plain one times decay**(L + 1 - depth): block i at depth i + 1, embeddings 0,
  # the rest (final norm, heads) L + 1. Stacked leaves get one factor per layer slice.
  L, decay = 3, 0.5
  base = _cfg(lr=1e-2, weight_decay=0.0, schedule="constant", warmup_steps=0, grad_clip=0.0)
  decayed = _cfg(lr=1e-2, weight_decay=0.0, schedule="constant", warmup_steps=0,
                 grad_clip=0.0, layer_decay=decay)
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  stacked = {"embed": jax.random.normal(k[0], (5, 4)),
             "embed_norm": {"scale": jax.random.normal(k[1], (4,))},
             "blocks": {"mlp": {"up": {"kernel": jax.random.normal(k[2], (L, 4, 4))}}},
             "classifier": {"kernel": jax.random.normal(k[3], (4, 2))}}
  unrolled = {**stacked, "blocks": {i: {"mlp": {"up": {"kernel": stacked["blocks"]["mlp"]["up"][
      "kernel"][i]}}} for i in range(L)}}

  def first_update(cfg, grads):
    tx = make_optimizer(cfg.train, num_layers=L)
    return tx.update(grads, tx.init(grads), grads)[0]

  plain = first_update(base, stacked)
  got = first_update(decayed, stacked)
  np.testing.assert_allclose(got["embed"], plain["embed"] * decay ** (L + 1), rtol=1e-6)
  np.testing.assert_allclose(got["embed_norm"]["scale"],
                             plain["embed_norm"]["scale"] * decay ** (L + 1), rtol=1e-6)
  np.testing.assert_allclose(got["classifier"]["kernel"], plain["classifier"]["kernel"])
  kernel = got["blocks"]["mlp"]["up"]["kernel"]
  for i in range(L):
    np.testing.assert_allclose(kernel[i], plain["blocks"]["mlp"]["up"]["kernel"][i]
                               * decay ** (L - i), rtol=1e-6)
  flat = first_update(decayed, unrolled)
  for i in range(L):
    np.testing.assert_allclose(flat["blocks"][i]["mlp"]["up"]["kernel"], kernel[i], rtol=1e-6)


def test_layer_decay_out_of_range_is_a_config_error():
  from lmos_jax.config.loading import ConfigError, validate
  for bad in (0.0, 1.5):
    with pytest.raises(ConfigError, match="train.layer_decay"):
      validate(tiny_config(layer_decay=bad), num_devices=1)


def test_l2_penalty_adds_to_loss():
  base = _run(_cfg(), (1, 1, 1), steps=1, devices=jax.devices()[:1])[0][0]
  with_l2 = _run(_cfg(l2=1e-2), (1, 1, 1), steps=1, devices=jax.devices()[:1])[0][0]
  assert with_l2 > base + 1e-4  # f32 noise on a loss of ~4.2 is ~1e-6; 1e-4 is a real penalty


def _keep_grads() -> optax.GradientTransformation:
  """An 'optimizer' that leaves params alone and keeps the step's gradients as its state."""
  return optax.GradientTransformation(
      init=lambda p: jax.tree.map(jnp.zeros_like, p),
      update=lambda g, _, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def _step_grads(graphdef, state, batch, l2):
  scfg = StepConfig(graphdef=graphdef, tx=_keep_grads(), loss_fn=lm_loss,
                    policy=resolve_policy("fp32"), l2=l2)
  new, _ = jax.jit(functools.partial(train_step, scfg))(state, batch)
  return jax.device_get(new["opt_state"])


def test_l2_changes_each_decayed_gradient_by_l2_times_the_weight():
  """grad(loss + l2/2 |w|^2) - grad(loss) == l2 * w on the decayed params (kernels), and 0 on
  embeddings, norms and biases (decay_embeddings = decay_norms_and_biases = False)."""
  cfg = _cfg()
  cfg.model.use_bias = True  # biases too, so their exclusion is checked
  mesh = make_mesh((1, 1, 1), jax.devices()[:1])
  graphdef, state, _ = init_train_state(model_factory(cfg.model, VOCAB), _keep_grads(),
                                        resolve_policy("fp32"), mesh, seed=0)
  params = jax.device_get(state["params"])
  l2 = 0.25
  with jax.set_mesh(mesh):
    plain = _step_grads(graphdef, state, _batch(), 0.0)
    with_l2 = _step_grads(graphdef, state, _batch(), l2)
  names = leaves_by_path(params)
  kinds = {n: bool(d) for n, d in leaves_by_path(decay_mask_fn(False, False)(params)).items()}
  assert any(kinds.values()) and not all(kinds.values())
  assert any(n.endswith("bias") for n in names) and any("norm" in n for n in names)
  g0, g1 = leaves_by_path(plain), leaves_by_path(with_l2)
  eps = np.finfo(np.float32).eps
  for name, w in names.items():
    want = l2 * w if kinds[name] else np.zeros_like(w)
    # f32 rounding only: one rounding of l2*w and one of the sum, each within eps/2 relative
    bound = eps * (np.abs(g1[name]) + np.abs(want)) + np.finfo(np.float32).tiny
    err = np.abs((g1[name] - g0[name]) - want)
    assert (err <= bound).all(), (name, float(err.max()))
    if not kinds[name]:
      np.testing.assert_array_equal(g1[name], g0[name], err_msg=name)


def test_label_smoothing_is_the_cross_entropy_against_optax_smoothed_one_hots():
  """`cross_entropy` (no one-hot built) against optax.smooth_labels on one-hot targets and
  optax.softmax_cross_entropy, on 77-way logits of a spread like a trained head's."""
  from lmos_jax.train.losses import cross_entropy
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(scale=4.0, size=(64, 77)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 77, size=64), jnp.int32)
  np.testing.assert_array_equal(cross_entropy(logits, labels),
                                optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  for a in (0.1, 0.5):
    want = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(labels, 77), a))
    # f32: two logsumexp-based sums of terms up to ~30, each rounded at eps relative
    np.testing.assert_allclose(cross_entropy(logits, labels, a), want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(cross_entropy(logits, labels, 0.1), cross_entropy(logits, labels))


def test_label_smoothing_reaches_the_assembled_loss_in_training_only():
  """`train.label_smoothing` changes the loss the assembled step trains on (a dropout key
  given) and leaves the eval loss (no key) the plain cross-entropy."""
  from lmos_jax.train.assemble import assemble_step
  from lmos_jax.train.losses import cross_entropy
  batch = _batch()
  mesh = make_mesh((1, 1, 1), jax.devices()[:1])
  cfg = _cfg(label_smoothing=0.2)
  step = assemble_step(cfg, mesh, VOCAB)
  with jax.set_mesh(mesh):
    state = jax.jit(step.init_fn, out_shardings=step.shardings)(jax.random.PRNGKey(0))
  model = nnx.merge(step.graphdef, state["params"])
  logits = model(batch["inputs"])
  n = batch["targets"].size
  trained, weight, _ = step.step_cfg.loss_fn(model, batch, jax.random.PRNGKey(1))
  evaluated, _, _ = step.step_cfg.loss_fn(model, batch, None)
  np.testing.assert_allclose(trained / weight, cross_entropy(logits, batch["targets"], 0.2).mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(evaluated / n, cross_entropy(logits, batch["targets"]).mean(),
                             rtol=1e-6)
  # an untrained model is near uniform, where smoothing changes little: the two still differ
  # by 40x the tolerance above, so neither check would pass on the other loss
  assert abs(float(trained - evaluated)) > 10 * 1e-6 * float(evaluated)
  from lmos_jax.config.loading import ConfigError, validate
  for bad in (-0.1, 1.0):
    with pytest.raises(ConfigError, match="train.label_smoothing"):
      validate(_cfg(label_smoothing=bad), num_devices=1)


def test_dropout_only_in_training():
  """model.dropout > 0: train-mode losses depend on the key; evaluation after a jitted train
  step is deterministic and equals the same params run with dropout 0."""
  cfg = _cfg(lr=1e-2, warmup_steps=0, schedule="constant")
  cfg.model.dropout = 0.3
  mesh = make_mesh((1, 1, 1), jax.devices()[:1])
  tx = make_optimizer(cfg.train)
  graphdef, state, shardings = init_train_state(model_factory(cfg.model, VOCAB), tx,
                                                resolve_policy("fp32"), mesh, seed=0)
  scfg = StepConfig(graphdef=graphdef, tx=tx, loss_fn=lm_loss, policy=resolve_policy("fp32"))
  batch = _batch()
  train_loss = jax.jit(lambda p, k: lm_loss(nnx.merge(graphdef, p), batch, k)[0])
  a = float(train_loss(state["params"], jax.random.PRNGKey(1)))
  again = float(train_loss(state["params"], jax.random.PRNGKey(1)))
  b = float(train_loss(state["params"], jax.random.PRNGKey(2)))
  no_dropout = float(train_loss(state["params"], None))
  assert a == again and a != b and no_dropout not in (a, b)
  step = jit_train_step(scfg, shardings, mesh, {k: v.ndim for k, v in batch.items()})
  with jax.set_mesh(mesh):
    state, _ = step(state, batch)
  evaluate = jax.jit(functools.partial(eval_step, scfg))
  first, second = evaluate(state["params"], batch), evaluate(state["params"], batch)
  cfg.model.dropout = 0.0
  graphdef0, _ = abstract_model_state(model_factory(cfg.model, VOCAB))
  ref = jax.jit(functools.partial(eval_step, StepConfig(
      graphdef=graphdef0, tx=tx, loss_fn=lm_loss, policy=resolve_policy("fp32"))))(
          state["params"], batch)
  assert float(first["loss_sum"]) == float(second["loss_sum"])  # bitwise: same program
  # bitwise too: without a key dropout is a Python-level no-op, so both trace the same program
  np.testing.assert_array_equal(np.asarray(first["loss_sum"]), np.asarray(ref["loss_sum"]))


def _dot_operand_types(stablehlo: str) -> list[tuple[str, ...]]:
  """Element types of the operands of every dot_general in StableHLO text."""
  out = []
  for line in stablehlo.splitlines():
    if "stablehlo.dot_general" in line:
      operands = line.rsplit(" : (", 1)[1].split(") -> ", 1)[0]
      out.append(tuple(re.findall(r"tensor<(?:[0-9]+x)*([a-z0-9]+)>", operands)))
  return out


def _one_device_step(precision: str):
  """(mesh, initial state, batch, jitted train step) of the tiny LM on one device."""
  cfg = _cfg()
  mesh = make_mesh((1, 1, 1), jax.devices()[:1])
  tx = make_optimizer(cfg.train)
  policy = resolve_policy(precision)
  graphdef, state, shardings = init_train_state(model_factory(cfg.model, VOCAB), tx, policy,
                                                mesh, seed=0)
  scfg = StepConfig(graphdef=graphdef, tx=tx, loss_fn=lm_loss, policy=policy)
  batch = _batch()
  return mesh, state, batch, jit_train_step(scfg, shardings, mesh,
                                            {k: v.ndim for k, v in batch.items()})


@pytest.mark.parametrize("precision,dtype", [("bf16", "bf16"), ("fp32", "f32")])
def test_policy_sets_the_matmul_input_dtype(precision, dtype):
  """Every matmul of the lowered train step (forward and backward) reads `dtype` operands,
  while the params the step takes and returns stay float32."""
  mesh, state, batch, step = _one_device_step(precision)
  with jax.set_mesh(mesh):
    lowered = step.lower(state, batch)
  dots = _dot_operand_types(lowered.as_text())
  # the layer body (scanned: traced once) has 7 projections and the LM head one more, each a
  # forward and two backward dots; the LM head's backward is the one autodiff alone would
  # run in float32 (see layers.logits_matmul)
  assert len(dots) >= 3 * 8, len(dots)
  assert all(t == (dtype, dtype) for t in dots), sorted(set(dots))
  params_in = lowered.args_info[0][0]["params"]
  assert {a.dtype for a in jax.tree.leaves(params_in)} == {jnp.dtype(jnp.float32)}
  params_out = jax.eval_shape(step, state, batch)[0]["params"]
  assert {a.dtype for a in jax.tree.leaves(params_out)} == {jnp.dtype(jnp.float32)}


def _dot_result_types(stablehlo: str) -> list[tuple[str, str]]:
  """(operand element type, result element type) of every dot_general in StableHLO text."""
  out = []
  for line in stablehlo.splitlines():
    if "stablehlo.dot_general" in line:
      types = re.findall(r"tensor<(?:[0-9]+x)*([a-z0-9]+)>", line.rsplit(" : (", 1)[1])
      out.append((types[0], types[-1]))
  return out


def test_bf16_matmul_policy_rounds_only_the_dense_matmul_operands():
  """Under bf16_matmul the Dense layers' matmuls, forward and backward, read bf16 operands
  and write float32; the rest (attention scores, the LM head) stays float32; params, loss
  and the first step's loss track the fp32 policy's."""
  mesh, state, batch, step = _one_device_step("bf16_matmul")
  with jax.set_mesh(mesh):
    lowered = step.lower(state, batch)
    new_state, metrics = step(state, batch)
  dots = _dot_result_types(lowered.as_text())
  bf16 = [d for d in dots if d[0] == "bf16"]
  # 7 projections per layer (q, k, v fused or not, out, gate, up, down): a forward and two
  # backward dots each
  assert len(bf16) >= 3 * 7 and all(out == "f32" for _, out in bf16), sorted(set(dots))
  assert {d for d in dots if d[0] != "bf16"} == {("f32", "f32")}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_state["params"]))
  mesh, state32, batch, step32 = _one_device_step("fp32")
  with jax.set_mesh(mesh):
    _, metrics32 = step32(state32, batch)
  # the loss at init through bf16-rounded operands (2^-9 relative each, averaging out over
  # each sum): within 0.5% of float32's, and computed (not equal bitwise)
  loss, loss32 = float(metrics["loss"]), float(metrics32["loss"])
  assert loss != loss32 and abs(loss - loss32) < 5e-3 * loss32


def test_bf16_operand_matmul_gradients_are_the_rounded_products():
  """Under JAX's bfloat16 matmul precision a float32 Dense matmul and its two gradients are
  the float64 products of bf16-rounded operands (cotangent included), within float32
  summation of 64 terms (~1e-6 relative); without it, the float32 product."""
  kx, kw, kc = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (2, 5, 4, 16))  # (B, T, N, H): two contracted axes
  w = jax.random.normal(kw, (4, 16, 24))
  c = jax.random.normal(kc, (2, 5, 24))
  loss = lambda x, w: jnp.sum(kernel_matmul(x, w, 2) * c)  # noqa: E731
  with jax.default_matmul_precision("bfloat16"):
    y = kernel_matmul(x, w, 2)
    dx, dw = jax.grad(loss, (0, 1))(x, w)
  as64 = lambda a: np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32), np.float64)  # noqa: E731
  xb, wb, cb = as64(x), as64(w), as64(c)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
  close(np.asarray(y), np.einsum("btnh,nho->bto", xb, wb))
  close(np.asarray(dx), np.einsum("bto,nho->btnh", cb, wb))
  close(np.asarray(dw), np.einsum("btnh,bto->nho", xb, cb))
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  full = np.einsum("btnh,nho->bto", np.asarray(x, np.float64), np.asarray(w, np.float64))
  close(np.asarray(kernel_matmul(x, w, 2)), full)
  assert np.abs(np.asarray(y) - full).max() > 1e-3  # the rounding did happen


@pytest.mark.parametrize("kind", ["constant", "warmup_cosine", "warmup_linear", "rsqrt", "wsd"])
def test_schedules(kind):
  c = _cfg(schedule=kind, lr=1.0, warmup_steps=10, steps=100, min_lr_ratio=0.1,
           decay_fraction=0.2)
  s = make_schedule(c.train)
  # f32 schedules (a division, a cos or a sqrt: a few roundings, ~1e-7 relative) against
  # float64 expectations: rel 1e-5 (~80 eps), 1e-4 at the ends (looser still), abs 1e-6 at 0
  assert float(s(0)) == pytest.approx(0.0, abs=1e-6)
  assert float(s(5)) == pytest.approx(0.5, rel=1e-5)
  assert float(s(10)) == pytest.approx(1.0, rel=1e-5)
  end = float(s(100))
  expected_end = {"constant": 1.0, "warmup_cosine": 0.1, "warmup_linear": 0.1,
                  "rsqrt": (10 / 100) ** 0.5, "wsd": 0.1}[kind]
  assert end == pytest.approx(expected_end, rel=1e-4)
  if kind == "wsd":
    assert float(s(79)) == pytest.approx(1.0)  # stable until the last 20%: exactly 1.0 in f32
    assert float(s(90)) == pytest.approx(0.55, rel=1e-4)


BF16_CPU = "processor\t: 0\nmodel name\t: Some EPYC\nflags\t\t: fpu sse avx512f avx512_bf16\n\n"
PLAIN_CPU = "processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse avx2 avx512f\n\n"


def test_precision_policies():
  assert resolve_policy("auto", "cpu", PLAIN_CPU).name == "fp32"
  assert resolve_policy("auto", "cpu", "").name == "fp32"  # no /proc/cpuinfo: float32
  assert resolve_policy("auto", "cpu", BF16_CPU).name == "bf16_matmul"
  assert resolve_policy("auto", "gpu", BF16_CPU).name == "bf16"
  assert resolve_policy("fp32", "cpu", BF16_CPU).name == "fp32"  # a named policy is kept
  name, why = auto_precision("cpu", BF16_CPU)  # the log line says why, and how to opt out
  assert name == "bf16_matmul" and "avx512_bf16" in why and "precision=fp32" in why
  p = resolve_policy("bf16")
  assert p.param_dtype == jnp.float32 and p.compute_dtype == jnp.bfloat16
  assert resolve_policy("bf16_full").param_dtype == jnp.bfloat16
  m = resolve_policy("bf16_matmul")
  assert m.matmul_bf16 and m.param_dtype == m.compute_dtype == jnp.float32
  assert not any(resolve_policy(n, "cpu", PLAIN_CPU).matmul_bf16 for n in ("fp32", "bf16", "auto"))
  # the MFU's peak is probed in bf16 for every policy whose matmuls take bf16 operands
  assert [resolve_policy(n).bf16_operands for n in ("fp32", "bf16_matmul", "bf16", "bf16_full")
          ] == [False, True, True, True]
  with pytest.raises(ValueError, match="train.precision"):
    resolve_policy("fp8")


def test_bf16_policy_keeps_fp32_master_weights_and_loss():
  mesh, state, batch, step = _one_device_step("bf16")
  with jax.set_mesh(mesh):
    state, metrics = step(state, batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
  assert metrics["loss"].dtype == jnp.float32
  assert 3.0 < float(metrics["loss"]) < 5.5  # ~ln 64 = 4.16 at init: a sanity band, not f32


def test_logits_matmul_gradients_equal_autodiff_in_f32():
  """The LM head's custom backward (operand-dtype matmuls) is plain autodiff in float32."""
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x, w = jax.random.normal(kx, (2, 8, 16)), jax.random.normal(kw, (16, 24))
  def loss(f):
    return lambda a, b: jnp.sum(jnp.sin(f(a, b)))
  plain = lambda a, b: jnp.einsum("btd,dv->btv", a, b, preferred_element_type=jnp.float32)  # noqa: E731
  got = jax.grad(loss(logits_matmul), (0, 1))(x, w)
  want = jax.grad(loss(plain), (0, 1))(x, w)
  np.testing.assert_array_equal(logits_matmul(x, w), plain(x, w))
  # f32: the same products; only XLA's choice of summation order may differ. Each gradient
  # sums 16 or 24 products with sum|terms| up to ~19 (|g| up to ~10): another order moves an
  # element by up to ~2e-6 (worst case n*eps/2*sum|terms| ~ 2.5e-5), so atol 1e-5
  assert_trees_close(got, want, rtol=1e-6, atol=1e-5)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  gx, gw = jax.grad(loss(logits_matmul), (0, 1))(xb, wb)
  assert logits_matmul(xb, wb).dtype == jnp.float32
  assert gx.dtype == gw.dtype == jnp.bfloat16


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1)])
def test_sharded_optimizer_update_equals_single_device(single_device, mesh_shape):
  """mesh.opt_state=sharded (ZeRO-1): Adam's moments live split over the data devices and
  each updates its part, then the params are gathered; the run matches one device (the
  tolerances of test_sharded_equals_single_device) and the moments really are split."""
  from lmos_jax.train.step import train_state_layout
  cfg = _cfg()
  mesh = make_mesh(mesh_shape, jax.devices())
  tx = make_optimizer(cfg.train)
  graphdef, init, _, shardings, update_sh = train_state_layout(
      model_factory(cfg.model, VOCAB), tx, resolve_policy("fp32"), mesh, shard_updates=True)
  scfg = StepConfig(graphdef=graphdef, tx=tx, loss_fn=lm_loss, policy=resolve_policy("fp32"),
                    schedule=make_schedule(cfg.train), update_shardings=update_sh,
                    param_shardings=shardings["params"])
  batch = _batch()
  step = jit_train_step(scfg, shardings, mesh, {k: v.ndim for k, v in batch.items()})
  losses = []
  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
    for _ in range(2):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses, single_device[0], rtol=1e-5)
  _assert_close(jax.device_get(state["params"]), single_device[1], atol=1e-3)
  data = mesh_shape[0]
  split = [x for x in jax.tree.leaves(state["opt_state"])
           if hasattr(x, "sharding") and x.ndim >= 1 and x.size >= 64]
  assert split and all(  # every sizeable moment: 1/data of it per device (fsdp's part aside)
      x.addressable_shards[0].data.size * data <= x.size for x in split)
  params = jax.tree.leaves(state["params"])
  assert all(p.sharding.is_equivalent_to(s, p.ndim) for p, s in
             zip(params, jax.tree.leaves(shardings["params"])))


def test_opt_state_auto_splits_on_accelerators_only():
  """mesh.opt_state=auto: split (ZeRO-1) on GPU/TPU when every param trains; replicated on
  CPU devices, which share the host's memory (and where the split measured slower); sharded
  and replicated are obeyed everywhere; a LoRA run stays replicated under auto."""
  from lmos_jax.train.assemble import splits_opt_state
  cfg = tiny_config()
  assert cfg.mesh.opt_state == "auto"
  assert [splits_opt_state(cfg, p) for p in ("cpu", "gpu", "tpu")] == [False, True, True]
  cfg.mesh.opt_state = "sharded"
  assert splits_opt_state(cfg, "cpu") and splits_opt_state(cfg, "gpu")
  cfg.mesh.opt_state = "replicated"
  assert not splits_opt_state(cfg, "gpu")
  cfg.mesh.opt_state, cfg.peft.method = "auto", "lora"
  assert not splits_opt_state(cfg, "gpu")


@pytest.mark.parametrize("precision", ["fp32", "bf16_full"])
def test_layout_abstract_state_is_what_init_returns(precision):
  """The layout's abstract state is composed from the model's shapes (not by tracing init
  again); it must equal, leaf for leaf, what the init function really returns."""
  from lmos_jax.train.step import train_state_layout
  cfg = _cfg(weight_decay=0.1)
  _, init, abstract, _, _ = train_state_layout(
      model_factory(cfg.model, VOCAB), make_optimizer(cfg.train), resolve_policy(precision),
      make_mesh((1, 1, 1), jax.devices()[:1]))
  traced = jax.eval_shape(init, jax.random.PRNGKey(3))
  assert jax.tree.structure(abstract) == jax.tree.structure(traced)
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(abstract)] == [
      (x.shape, x.dtype) for x in jax.tree.leaves(traced)]
