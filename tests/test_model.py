"""GPT model: shapes, parameter count, causality, segment isolation, scan == unrolled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_tcfg
from lmos_jax.models.gpt import GPT, count_params

VARIANTS = {
    "gpt2": {},
    "llama": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", num_kv_heads=2,
                  tie_embeddings=False, use_bias=False),
}


def _model(**kw):
  return GPT(tiny_tcfg(**kw), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_param_count(variant):
  cfg = tiny_tcfg(**VARIANTS[variant])
  model = GPT(cfg, rngs=nnx.Rngs(0))
  logits = model(jnp.zeros((3, 16), jnp.int32))
  assert logits.shape == (3, 16, cfg.vocab_size) and logits.dtype == jnp.float32
  d, f, v, l, h = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.num_layers, cfg.head_dim
  if variant == "gpt2":  # tied embeddings, learned positions, biases, 2 LayerNorms per block
    attn = 4 * d * d + 4 * d
    mlp = 2 * d * f + f + d
    expected = v * d + 16 * d + l * (attn + mlp + 4 * d) + 2 * d
  else:  # untied head, GQA (2 kv heads), SwiGLU, RMSNorm, no biases
    attn = d * d + 2 * d * (2 * h) + d * d
    expected = 2 * v * d + l * (attn + 3 * d * f + 2 * d) + d
  assert count_params(nnx.state(model, nnx.Param)) == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(variant, monkeypatch):
  """d logits[t] / d embedding[s] == 0 for every s > t, through the model's own call: a
  zero perturbation is added to the embedded tokens and differentiated."""
  model = _model(**VARIANTS[variant])
  tokens = jnp.arange(16, dtype=jnp.int32)[None] % 61
  embed = GPT.embed_tokens

  def logits_at(t, delta_TD):
    monkeypatch.setattr(GPT, "embed_tokens",
                        lambda self, ids, pos, dtype: embed(self, ids, pos, dtype) + delta_TD)
    return model(tokens)[0, t].sum()

  zero_TD = jnp.zeros((16, model.cfg.d_model), jnp.float32)
  for t in (0, 7, 14):
    g = jax.grad(lambda d: logits_at(t, d))(zero_TD)
    assert float(jnp.abs(g[t + 1:]).max()) == 0.0  # exact: masked keys get weight exactly 0
    assert float(jnp.abs(g[: t + 1]).max()) > 0.0


def test_changing_future_token_leaves_past_logits():
  model = _model(**VARIANTS["llama"])
  a = jnp.arange(16, dtype=jnp.int32)[None]
  b = a.at[0, 10].set(3)
  la, lb = model(a), model(b)
  # bitwise: same program; position 10 reaches earlier rows only with exactly-zero weight
  np.testing.assert_array_equal(np.asarray(la[0, :10]), np.asarray(lb[0, :10]))
  assert float(jnp.abs(la[0, 10:] - lb[0, 10:]).max()) > 0


def test_segments_do_not_attend_across_documents():
  """A packed row gives each document the logits it gets alone (per-segment positions)."""
  model = _model(**VARIANTS["llama"])
  doc1, doc2 = jnp.arange(1, 7), jnp.arange(20, 30)
  packed = jnp.concatenate([doc1, doc2])[None].astype(jnp.int32)
  seg = jnp.array([[1] * 6 + [2] * 10])
  pos = jnp.concatenate([jnp.arange(6), jnp.arange(10)])[None]
  out = model(packed, position_ids=pos, segment_ids=seg)
  alone1, alone2 = model(doc1[None].astype(jnp.int32)), model(doc2[None].astype(jnp.int32))
  # f32: a segment inside a 16-token row vs alone (other shapes, so other reduction blocking);
  # logits are ~0.3 (ulp 3e-8), so 1e-5 is ~300 ulp
  np.testing.assert_allclose(out[0, :6], alone1[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 6:], alone2[0], atol=1e-5)


def test_scan_equals_unrolled_and_remat():
  tokens = (jnp.arange(32, dtype=jnp.int32).reshape(2, 16) * 7) % 61
  ref = _model(scan_layers=False)
  ref_pure = nnx.to_pure_dict(nnx.split(ref)[1])
  ref_out = ref(tokens)
  for remat in ("none", "full", "dots"):
    graphdef, _ = nnx.split(_model(scan_layers=True, remat=remat))
    pure = dict(ref_pure)  # same weights, layers stacked on a leading axis
    pure["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), ref_pure["blocks"][0],
                                  ref_pure["blocks"][1])
    out = nnx.merge(graphdef, pure)(tokens)
    # f32, stacked layers in a scan (remat only recomputes) vs unrolled: fusion and reduction
    # order may differ; logits ~0.6 (ulp 6e-8), 2e-5 is ~300 ulp
    np.testing.assert_allclose(out, ref_out, atol=2e-5)
