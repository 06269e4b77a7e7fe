"""PEFT on the GPT model: identity at init, only adapters train, LoRA merge, AdaLoRA budget."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from helpers import leaves_by_path, tiny_config, tiny_tcfg
from lmos_jax.config.schema import base_config
from lmos_jax.models.gpt import GPT
from lmos_jax.peft.adalora import SVDDense, orthogonality_penalty
from lmos_jax.peft.lora import LoRADense, set_dropout_keys
from lmos_jax.peft.methods import (apply_peft, peft_loss, peft_optimizer, trainable_for,
                                   wrap_factory)
from lmos_jax.peft.wrap import (count_trainable, load_adapters, overlay_params, save_adapters,
                                split_by)
from lmos_jax.train.losses import lm_loss
from lmos_jax.train.optim import make_optimizer
from lmos_jax.train.precision import resolve_policy
from lmos_jax.train.step import StepConfig, eval_step, loss_and_grads, train_step



def peft_cfg(method: str, **kw) -> ml_collections.ConfigDict:
  p = base_config().peft
  p.method = method
  p.rank, p.adapter_size, p.target_rank = 4, 8, 2
  for k, v in kw.items():
    p[k] = v
  return p


def tokens(b=4, t=16, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, 61)


def batch(seed=0):
  x = tokens(seed=seed)
  return {"inputs": x, "targets": jnp.roll(x, -1, axis=1)}


def params_of(model):
  return nnx.to_pure_dict(nnx.split(model)[1])


@pytest.mark.parametrize("method,scan", [("lora", True), ("lora", False), ("adapters", True),
                                         ("adalora", True)])
def test_adapted_model_equals_base_at_init(method, scan):
  tcfg = tiny_tcfg(scan_layers=scan)
  base = GPT(tcfg, rngs=nnx.Rngs(0))
  ref = base(tokens())
  wrapped = apply_peft(base, peft_cfg(method), rngs=1)
  assert wrapped, "nothing was wrapped"
  np.testing.assert_array_equal(np.asarray(base(tokens())), np.asarray(ref))


def test_bad_target_regex_names_field_and_paths():
  model = GPT(tiny_tcfg(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"peft.target_modules.*blocks/attn/query"):
    apply_peft(model, peft_cfg("lora", target_modules="nope$"))


def _step_setup(method, **kw):
  p = peft_cfg(method, **kw)
  c = tiny_config(steps=20, lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0)
  make = wrap_factory(lambda rngs: GPT(tiny_tcfg(), rngs=rngs), p)
  model = make(nnx.Rngs(params=0))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  trainable = trainable_for(p)
  tx = peft_optimizer(make_optimizer(c.train, trainable), p, c.train.steps)
  cfg = StepConfig(graphdef=graphdef, tx=tx, loss_fn=peft_loss(lm_loss, p),
                   policy=resolve_policy("fp32"), trainable=trainable)
  st = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
        "rng": jax.random.PRNGKey(0)}
  return cfg, st, trainable, p


@pytest.mark.parametrize("method", ["lora", "adapters"])  # adalora: in the budget test
def test_only_adapter_params_change_and_frozen_have_no_opt_state(method):
  cfg, st, trainable, _ = _step_setup(method)
  before = jax.tree.map(np.asarray, st["params"])
  n_train, n_total = count_trainable(before, trainable)
  assert 0 < n_train < n_total / 5
  # Adam holds two moments per *trainable* element only; frozen params hold nothing.
  opt_elems = sum(x.size for x in jax.tree.leaves(st["opt_state"]) if x.ndim > 0)
  assert opt_elems == 2 * n_train
  step = jax.jit(lambda s, b: train_step(cfg, s, b))
  new, metrics = step(st, batch())
  assert np.isfinite(float(metrics["loss"]))
  after = jax.tree.map(np.asarray, new["params"])
  t_before, f_before = split_by(before, trainable)
  t_after, f_after = split_by(after, trainable)
  for k in f_before:
    np.testing.assert_array_equal(f_after[k], f_before[k], err_msg=k)
  changed = [k for k in t_before if not np.array_equal(t_after[k], t_before[k])]
  assert changed, "no adapter param changed"


def test_grads_only_for_trainable_match_full_grads():
  cfg, st, trainable, _ = _step_setup("lora")
  # Move B off zero so A gets a gradient too.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if "lora_b" in str(p) else x, st["params"])
  full_cfg = StepConfig(**{**cfg.__dict__, "trainable": None})
  _, _, _, g_sub = jax.jit(lambda p, b: loss_and_grads(cfg, p, b, None))(params, batch())
  _, _, _, g_full = jax.jit(lambda p, b: loss_and_grads(full_cfg, p, b, None))(params, batch())
  t_sub, f_sub = split_by(g_sub, trainable)
  t_full, _ = split_by(g_full, trainable)
  for k in t_sub:
    # The same sums over the batch's tokens, fused differently by XLA in the two programs (and
    # differently again by each jax release): float32 reassociation moves each element by a
    # few ulps of the largest terms, so the bound scales with the gradient's magnitude.
    atol = 64 * np.finfo(np.float32).eps * float(np.abs(t_full[k]).max())
    np.testing.assert_allclose(t_sub[k], t_full[k], rtol=1e-5, atol=atol, err_msg=k)
  assert all(not np.any(np.asarray(v)) for v in f_sub.values())
  assert any(np.any(np.asarray(v)) for v in t_sub.values())


@pytest.mark.parametrize("scan", [True, False])
def test_merged_lora_equals_unmerged(scan):
  from lmos_jax.models.layers import Dense
  from lmos_jax.peft.methods import merge_and_unload
  model = GPT(tiny_tcfg(scan_layers=scan), rngs=nnx.Rngs(0))
  kernel0 = np.asarray(model.blocks.attn.query.kernel[...] if scan
                       else model.blocks[0].attn.query.kernel[...])
  apply_peft(model, peft_cfg("lora", target_modules="attn/(query|out)$|mlp/up$"), rngs=1)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, LoRADense):
      m.lora_b[...] = 0.05 * jax.random.normal(jax.random.PRNGKey(3), m.lora_b.shape)
  unmerged = np.asarray(model(tokens()))
  assert merge_and_unload(model) == (3 if scan else 3 * len(model.blocks))
  merged = np.asarray(model(tokens()))
  # x (W + s A B) vs x W + s (x A) B: the merged kernel rounds once per weight (eps |W|) and the
  # dots sum in other orders: ~1e-7 on logits ~0.5; atol 1e-5 ~ 160 ulp, rtol is spare
  np.testing.assert_allclose(merged, unmerged, rtol=1e-4, atol=1e-5)
  q = model.blocks.attn.query if scan else model.blocks[0].attn.query
  # the merge moves the kernel by s A B (~0.05, as large as W), far outside allclose's defaults
  assert type(q) is Dense and not np.allclose(np.asarray(q.kernel[...])[0 if scan else ...],
                                              kernel0[0] if scan else kernel0)


def test_lora_dropout_only_in_training():
  model = GPT(tiny_tcfg(), rngs=nnx.Rngs(0))
  apply_peft(model, peft_cfg("lora", dropout=0.5), rngs=1)
  q = model.blocks.attn.query
  q.lora_b[...] = jnp.ones(q.lora_b.shape)
  eval_out = np.asarray(model(tokens()))
  set_dropout_keys(model, jax.random.PRNGKey(7))  # half of the inputs of a B = 1 adapter
  assert not np.allclose(np.asarray(model(tokens())), eval_out)


def _without_dropout_keys(tree):
  if isinstance(tree, dict):
    return {k: _without_dropout_keys(v) for k, v in tree.items() if k != "dropout_key"}
  return tree


def test_lora_dropout_off_in_evaluation_after_a_jitted_train_step():
  """The train step draws LoRA dropout from its key; the state it returns carries no key, so
  evaluation afterwards is deterministic and equals the same params with dropout 0."""
  cfg, st, _, _ = _step_setup("lora", dropout=0.5)
  st["params"] = jax.tree_util.tree_map_with_path(  # B off zero: dropout changes the output
      lambda p, x: x + 0.1 if "lora_b" in str(p) else x, st["params"])
  loss = jax.jit(lambda p, k: loss_and_grads(cfg, p, batch(), k)[0])
  assert float(loss(st["params"], jax.random.PRNGKey(1))) != float(loss(st["params"], None))
  new, _ = jax.jit(lambda s, b: train_step(cfg, s, b))(st, batch())
  keys = [x for name, x in leaves_by_path(new["params"]).items() if name.endswith("dropout_key")]
  assert keys and not any(k.any() for k in keys)
  evaluate = jax.jit(lambda p: eval_step(cfg, p, batch())["loss_sum"])
  first, second = float(evaluate(new["params"])), float(evaluate(new["params"]))
  no_dropout, _, _, _ = _step_setup("lora", dropout=0.0)
  params0 = _without_dropout_keys(new["params"])
  ref = float(jax.jit(lambda p: eval_step(no_dropout, p, batch())["loss_sum"])(params0))
  assert first == second  # bitwise: the same program on the same inputs
  # ref's program has no select around the adapter input: the same values, but XLA may fuse
  # and order the 64-token sum differently (<= 64 eps ~ 8e-6); live dropout moves it ~4e-4
  np.testing.assert_allclose(second, ref, rtol=1e-5)


def test_adalora_budget_reaches_target_rank():
  steps = 12
  cfg, st, trainable, p = _step_setup("adalora", t_init=2, t_final=3, delta_t=2,
                                      target_modules="attn/(query|value)$")
  cfg = StepConfig(**{**cfg.__dict__, "tx": peft_optimizer(
      make_optimizer(tiny_config(steps=steps, lr=1e-2, warmup_steps=0).train, trainable), p,
      steps)})
  st["opt_state"] = cfg.tx.init(st["params"])
  before = jax.tree.map(np.asarray, st["params"])
  n_train, _ = count_trainable(before, trainable)
  yes, _ = split_by(before, trainable)
  svd = sum(v.size for k, v in yes.items() if k.rsplit("/", 1)[-1].startswith("lora_"))
  lam = sum(v.size for k, v in yes.items() if k.endswith("lora_lambda"))
  # Adam moments for trainable params only, plus importance EMAs (2 per SVD entry) and masks
  assert sum(x.size for x in jax.tree.leaves(st["opt_state"]) if x.ndim > 0) == (
      2 * n_train + 2 * svd + lam)
  step = jax.jit(lambda s, b: train_step(cfg, s, b))
  kept = []
  for i in range(steps):
    st, _ = step(st, batch(i))
    kept.append(int(sum(float(v.sum()) for v in st["opt_state"].mask.values())))
  slots = 2 * 2  # query and value, 2 stacked layers
  assert kept[0] == p.rank * slots  # before t_init: full budget
  assert kept[-1] == p.target_rank * slots
  assert kept[4] < p.rank * slots  # shrinking in the middle
  lams = [v for k, v in split_by(st["params"], trainable)[0].items()
          if k.endswith("lora_lambda")]
  assert sum(int((np.asarray(v) != 0).sum()) for v in lams) == p.target_rank * slots
  _, frozen_before = split_by(before, trainable)
  _, frozen_after = split_by(jax.tree.map(np.asarray, st["params"]), trainable)
  for k in frozen_before:
    np.testing.assert_array_equal(frozen_after[k], frozen_before[k], err_msg=k)


def test_orthogonality_penalty_matches_reference():
  """Orthonormal at init (penalty 0); against a numpy reference after a perturbation."""
  model = GPT(tiny_tcfg(), rngs=nnx.Rngs(0))
  apply_peft(model, peft_cfg("adalora"), rngs=1)
  # orthonormal up to f32 rounding: Gram entries are <= 32-term dot products, off by ~eps
  # each; the Frobenius norm of a 4x4 error is ~1e-6 at most
  assert float(orthogonality_penalty(model)) < 1e-5
  mods = [m for _, m in nnx.iter_modules(model) if isinstance(m, SVDDense)]
  terms = []
  for i, m in enumerate(mods):
    m.lora_p[...] = m.lora_p[...] * 1.5
    m.lora_q[...] = m.lora_q[...] + 0.1 * jax.random.normal(jax.random.PRNGKey(i),
                                                            m.lora_q.shape)
    lead, r = m.lora_lambda.shape[:-1], m.lora_lambda.shape[-1]
    p = np.asarray(m.lora_p[...]).reshape(int(np.prod(lead)), -1, r)
    q = np.asarray(m.lora_q[...]).reshape(int(np.prod(lead)), r, -1)
    for pl, ql in zip(p, q):
      terms.append(np.linalg.norm(pl.T @ pl - np.eye(r)))
      terms.append(np.linalg.norm(ql @ ql.T - np.eye(r)))
  # f32 against a float64 reference: Gram matrices of <= 32-term sums and square roots, a few
  # eps relative; rtol 1e-5 ~ 80 eps
  np.testing.assert_allclose(float(orthogonality_penalty(model)), np.mean(terms), rtol=1e-5)


def test_adapter_only_checkpoint_applies_on_base(tmp_path):
  cfg, st, trainable, p = _step_setup("lora")
  step = jax.jit(lambda s, b: train_step(cfg, s, b))
  for i in range(3):
    st, _ = step(st, batch(i))
  trained = nnx.merge(cfg.graphdef, st["params"])
  want = np.asarray(trained(tokens()))
  path = str(tmp_path / "adapters.safetensors")
  n = save_adapters(path, st["params"], trainable, {"peft.method": "lora"})
  assert n == count_trainable(st["params"], trainable)[0]
  flat, meta = load_adapters(path)
  assert meta["peft.method"] == "lora" and all("lora_" in k for k in flat)
  fresh = wrap_factory(lambda rngs: GPT(tiny_tcfg(), rngs=rngs), p)(nnx.Rngs(params=0))
  graphdef, state = nnx.split(fresh)
  restored = overlay_params(nnx.to_pure_dict(state), flat, "adapters.safetensors")
  # the same params bit for bit (f32 safetensors) through the same model: expected bit-equal;
  # the tolerance is a few ulp of O(0.5) logits, far below a lost or stale adapter
  np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, restored)(tokens())), want,
                             rtol=1e-5, atol=1e-6)
  bad = {"blocks/attn/query/lora_a": np.zeros((1, 2, 3), np.float32)}
  with pytest.raises(ValueError, match="blocks/attn/query/lora_a.*shape"):
    overlay_params(nnx.to_pure_dict(state), bad, "adapters.safetensors")


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_merge_and_unload_gives_base_tree_with_same_outputs(method):
  from lmos_jax.peft.methods import merge_and_unload, merged_params
  make = lambda rngs: GPT(tiny_tcfg(), rngs=rngs)  # noqa: E731
  p = peft_cfg(method)
  model = wrap_factory(make, p)(nnx.Rngs(params=0))
  for _, m in nnx.iter_modules(model):  # non-zero updates
    for name in ("lora_b", "lora_lambda"):
      if hasattr(m, name):
        v = getattr(m, name)
        v[...] = 0.1 * jax.random.normal(jax.random.PRNGKey(5), v.shape)
  want = np.asarray(model(tokens()))
  params = params_of(model)
  merged = merged_params(make, p, params)
  base_keys = set(split_by(params_of(make(nnx.Rngs(0))), lambda _: True)[0])
  assert set(split_by(merged, lambda _: True)[0]) == base_keys
  graphdef, state = nnx.split(make(nnx.Rngs(0)))
  nnx.replace_by_pure_dict(state, merged)
  # merged kernels (one rounding per weight) vs adapters beside them: ~1e-7 on logits ~0.6,
  # as in test_merged_lora_equals_unmerged
  np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, state)(tokens())), want,
                             rtol=1e-4, atol=1e-5)
  assert merge_and_unload(model) > 0
  np.testing.assert_allclose(np.asarray(model(tokens())), want, rtol=1e-4, atol=1e-5)
  ad = wrap_factory(make, peft_cfg("adapters"))(nnx.Rngs(params=0))
  with pytest.raises(ValueError, match="adapters are nonlinear"):
    merge_and_unload(ad)


def test_adalora_classification_loss_falls():
  """AdaLoRA with the default config (orthogonality penalty, dropout, pruning to half the rank)
  learns the tiny marker task that LoRA learns (tests/test_finetune.py). With plain lambda
  steps (lambda_lr_scale=1) it stayed at chance (~0.69) for 30 steps: P and Q are held
  orthonormal, so the update's size is only |lambda| <= sum of learning rates."""
  from test_finetune import synthetic_batch, tiny_cls_training
  p = peft_cfg("adalora", trainable_extra="classifier", rank=8, target_rank=4, t_init=5,
               t_final=5, delta_t=5, dropout=0.1, target_modules="attn/(query|key|value|out)$")
  steps = 30
  c = tiny_config(steps=steps, lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0)
  step, st, trainable = tiny_cls_training(p, c.train)
  losses = []
  for i in range(steps):
    st, m = step(st, synthetic_batch(i))
    losses.append(float(m["loss"]))
    if i == 0:  # Adam's first step is lr * g / (|g| + eps) <= lr, times lambda_lr_scale
      lam = np.abs(np.concatenate([np.ravel(v) for k, v in split_by(
          st["params"], trainable)[0].items() if k.endswith("lora_lambda")]))
      # |g| / (|g| + eps) with Adam's eps = 1e-8: the largest step is short of lr by eps/|g|;
      # rtol 1e-3 holds for the largest lambda gradient down to 1e-5 (here ~1e-4)
      np.testing.assert_allclose(lam.max(), c.train.lr * p.lambda_lr_scale, rtol=1e-3)
      # never above it: 1 + 1e-6 (~8 eps) absorbs the f32 rounding of lr * lambda_lr_scale
      assert (lam > 0).all() and lam.max() <= c.train.lr * p.lambda_lr_scale * (1 + 1e-6)
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert first > 0.65 and last < 0.6, (first, last)  # chance level is ln 2 = 0.69
  from lmos_jax.config.loading import ConfigError, _check_peft
  with pytest.raises(ConfigError, match="peft.lambda_lr_scale"):
    _check_peft(peft_cfg("adalora", lambda_lr_scale=0.0, t_final=1), steps)
