"""Layer trimming and distillation: asked layers go, the block choice, KD is zero at equality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmos_jax.compress.distill import distill_loss, kd_terms
from lmos_jax.compress.trim import drop_layers, least_important_block
from lmos_jax.models.gpt import GPT
from lmos_jax.models.layers import TransformerConfig

TOKENS = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, 30)


def tiny(scan: bool, layers: int = 4):
  cfg = TransformerConfig(vocab_size=30, num_layers=layers, num_heads=2, d_model=16, d_ff=32,
                          max_seq_len=12, scan_layers=scan, init_std=0.2)
  graphdef, state = nnx.split(GPT(cfg, rngs=nnx.Rngs(1)))
  return graphdef, state.to_pure_dict()


def forward(graphdef, params):
  return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, TOKENS))


def _layer(params, i, scan):
  b = params["blocks"]
  return jax.tree.map(lambda x: x[i], b) if scan else b[i]


@pytest.mark.parametrize("scan", [True, False])
def test_trim_drops_the_asked_layers_and_runs(scan):
  graphdef, params = tiny(scan)
  # make layer 2 an identity (zero residual contributions): the block choice must find it
  zero = lambda x: jnp.zeros_like(x)  # noqa: E731
  if scan:
    for part in ("attn", "mlp"):
      sub = params["blocks"][part]["out" if part == "attn" else "down"]
      for k in sub:
        sub[k] = sub[k].at[2].set(0.0)
  else:
    for part, name in (("attn", "out"), ("mlp", "down")):
      params["blocks"][2][part][name] = jax.tree.map(zero, params["blocks"][2][part][name])
  start, dists = least_important_block(graphdef, params, TOKENS, 1)
  # an identity layer's distance is f32 noise magnified by arccos near 1: cos = 1 - k eps gives
  # sqrt(2 k eps) / pi ~ 1.6e-4 sqrt(k), so 1e-3 admits k ~ 40; real layers sit above 0.1
  assert start == 2 and dists[2] < 1e-3 < dists.min(initial=1.0, where=np.arange(4) != 2)
  gd2, p2 = drop_layers(graphdef, params, [start])
  assert nnx.merge(gd2, p2).cfg.num_layers == 3
  # dropping an identity layer leaves the logits unchanged; the kept layers are the others
  # (x + 0 is exact: the same values, through a program one layer shorter that XLA may fuse
  # and order differently; O(1) logits, 1e-5 ~ 80 ulp)
  np.testing.assert_allclose(forward(gd2, p2), forward(graphdef, params), atol=1e-5)
  gd3, p3 = drop_layers(graphdef, params, [0, 3])
  np.testing.assert_array_equal(
      np.asarray(_layer(p3, 1, scan)["mlp"]["up"]["kernel"]),
      np.asarray(_layer(params, 2, scan)["mlp"]["up"]["kernel"]))
  assert nnx.merge(gd3, p3).cfg.num_layers == 2
  with pytest.raises(ValueError, match="layer indices"):
    drop_layers(graphdef, params, [4])


def test_distillation_loss_zero_when_student_equals_teacher():
  logits = 3.0 * jax.random.normal(jax.random.PRNGKey(2), (2, 5, 11))
  assert float(jnp.abs(kd_terms(logits, logits, 2.0)).max()) == 0.0
  other = logits + jax.random.normal(jax.random.PRNGKey(3), logits.shape)
  kd = kd_terms(other, logits, 2.0)
  # independent reference: T^2 * sum p_t log(p_t / p_s) at temperature T
  pt = np.exp(np.asarray(logits) / 2) / np.exp(np.asarray(logits) / 2).sum(-1, keepdims=True)
  ps = np.exp(np.asarray(other) / 2) / np.exp(np.asarray(other) / 2).sum(-1, keepdims=True)
  # f32 on both sides by different formulas (log-softmax vs log of a ratio of exps); KL sums
  # terms of both signs, so cancellation magnifies their ~eps errors: rtol 1e-4 (~1e3 eps)
  np.testing.assert_allclose(np.asarray(kd), 4 * (pt * np.log(pt / ps)).sum(-1), rtol=1e-4)
  # the task loss sees a "model" that is any callable tokens -> logits
  student = lambda inputs, rng=None: logits  # noqa: E731
  tokens = jnp.zeros((2, 5), jnp.int32)
  batch = {"inputs": tokens, "targets": tokens + 3, "teacher_logits": logits}
  total, weight, aux1 = distill_loss(2.0, 1.0)(student, batch, None)
  assert float(total) == 0.0 and float(aux1["kd"]) == 0.0 and float(weight) == 10
  total_half, _, aux = distill_loss(2.0, 0.5)(student, batch, None)
  # independent reference for the hard loss: -log softmax at the targets, float64 numpy
  z = np.asarray(logits, np.float64)
  log_p = z - z.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  ce_ref = -np.take_along_axis(log_p, np.asarray(batch["targets"])[..., None], -1).sum()
  # f32 log-softmax over 11 logits of size ~10, summed over 10 tokens: rtol 1e-5
  np.testing.assert_allclose(float(aux["ce"]), ce_ref, rtol=1e-5)
  # kd is exactly 0, so the total at alpha 0.5 is half the hard loss
  np.testing.assert_allclose(float(total_half), 0.5 * ce_ref, rtol=1e-5)

