"""The CPU attention path (blocked causal, heads-major) against jax.nn.dot_product_attention's
XLA reference, and the fused q/k/v projection against three separate ones; values and
gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import assert_trees_close, tiny_tcfg
from lmos_jax.models.gpt import GPT
from lmos_jax.models.layers import Attention, blocked_attention, resolve_attention_impl

# f32, the same softmax(q k^T) v summed in another order (blocked online softmax vs one pass):
# each output sums <= 64 terms, <= ~64 eps ~ 8e-6 relative at worst, typically sqrt(64) eps;
# gradients of sum(sin(.)) reach |g| ~ 20 (hence rtol) and cross zero (hence atol)
TOL = dict(rtol=2e-5, atol=2e-5)


def _qkv(b=2, t=64, s=64, n=4, kv=4, h=8, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (b, t, n, h)), jax.random.normal(ks[1], (b, s, kv, h)),
          jax.random.normal(ks[2], (b, s, kv, h)))


def _blocked_btnh(q, k, v, mask, is_causal, block):
  sw = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731
  return sw(blocked_attention(sw(q), sw(k), sw(v), mask, is_causal=is_causal, block=block))


def _reference(q, k, v, mask, is_causal):
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                      implementation="xla")


@pytest.mark.parametrize("block", [16, 32, 64, 128])  # 4, 2, 1 chunks; 128 > T: unblocked
@pytest.mark.parametrize("kv", [4, 2, 1])  # multi-head, grouped-query, multi-query
def test_blocked_causal_matches_reference_values_and_grads(block, kv):
  q, k, v = _qkv(kv=kv)
  got = _blocked_btnh(q, k, v, None, True, block)
  np.testing.assert_allclose(got, _reference(q, k, v, None, True), **TOL)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
  g_got = jax.grad(loss(lambda *a: _blocked_btnh(*a, None, True, block)), (0, 1, 2))(q, k, v)
  g_ref = jax.grad(loss(lambda *a: _reference(*a, None, True)), (0, 1, 2))(q, k, v)
  assert_trees_close(g_got, g_ref, **TOL)


def test_blocked_with_padding_mask_and_non_causal():
  q, k, v = _qkv(t=32, s=32)
  lengths = jnp.array([32, 20])
  valid = jnp.arange(32)[None, :] < lengths[:, None]
  mask = (valid[:, None, :, None] & valid[:, None, None, :])
  for is_causal in (False, True):
    got = _blocked_btnh(q, k, v, mask, is_causal, 16)
    want = _reference(q, k, v, mask, is_causal)
    # Rows of padded queries see no key at all; only real query rows are defined.
    np.testing.assert_allclose(got[1, :20], want[1, :20], **TOL)
    np.testing.assert_allclose(got[0], want[0], **TOL)


def test_decode_shape_one_query_over_cache():
  q, k, v = _qkv(t=1, s=48)
  mask = (jnp.arange(48) < 30)[None, None, None, :].repeat(2, 0)
  np.testing.assert_allclose(_blocked_btnh(q, k, v, mask, False, 16),
                             _reference(q, k, v, mask, False), **TOL)


def test_auto_picks_blocked_on_cpu_and_keeps_explicit_choices():
  assert jax.default_backend() == "cpu"
  assert resolve_attention_impl("auto") == "blocked"
  assert resolve_attention_impl("xla") == "xla" and resolve_attention_impl("cudnn") == "cudnn"


@pytest.mark.parametrize("extra", [{}, dict(num_kv_heads=2, pos_emb="rope", use_bias=False)])
def test_model_blocked_equals_xla_path(extra):
  """Whole GPT (fused q/k/v for multi-head, separate for GQA): blocked == XLA attention."""
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 61)
  out = {}
  for impl in ("blocked", "xla"):
    model = GPT(tiny_tcfg(attention_impl=impl, **extra), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    f = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)  # noqa: E731
    out[impl] = jax.value_and_grad(f)(params)
  np.testing.assert_allclose(out["blocked"][0], out["xla"][0], **TOL)
  # parameter gradients of mean(out^2) are <= ~2e-2 and sum over B*T = 32 positions through 2
  # layers: atol 1e-6 (5e-5 of the largest) for entries near zero, rtol 1e-4 for the rest
  assert_trees_close(out["blocked"][1], out["xla"][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("use_bias", [True, False])
def test_fused_qkv_projection_equals_separate(monkeypatch, use_bias):
  """The one stacked (D, 3, N, H) matmul gives the q, k, v (rope included) and gradients of
  the three separate Dense layers it replaces."""
  model = GPT(tiny_tcfg(scan_layers=False, pos_emb="rope", use_bias=use_bias),
              rngs=nnx.Rngs(0))
  attn = model.blocks[0].attn
  assert attn._fusable_qkv(64) and not attn._fusable_qkv(63)  # x below has 4 x 16 tokens
  graphdef, params = nnx.split(attn)
  if use_bias:  # zero-initialised biases would not show a wrong bias layout
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * jnp.arange(x.size).reshape(x.shape) / x.size
        if "bias" in jax.tree_util.keystr(p) else x, params)
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 16, 32))
  positions = jnp.broadcast_to(jnp.arange(16), (4, 16))

  def project(p):
    return nnx.merge(graphdef, p).project_qkv(x, positions)

  def loss(p):
    return sum(jnp.sum(jnp.sin(a) * w) for a, w in zip(project(p), (1.0, 2.0, 3.0), strict=True))

  fused, g_fused = project(params), jax.grad(loss)(params)
  monkeypatch.setattr(Attention, "_fusable_qkv", lambda self, n: False)
  separate, g_separate = project(params), jax.grad(loss)(params)
  # the same 32-term dot products, from one stacked matmul or three: TOL's reordering bound
  assert_trees_close(fused, separate, **TOL)
  assert_trees_close(g_fused, g_separate, **TOL)
