"""Weight-only quantization: error bounds, int4 packing, save/load as quantized, QAT's STE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmos_jax.compress.kernels import KernelLayout, kernel_layouts
from lmos_jax.compress.quantize import (QArray, dequantize_kernel, dequantize_params,
                                         fake_quant, pack_int4, param_bytes, qat_loss,
                                         quantize_kernel, quantize_params, unpack_int4)
from lmos_jax.compress.store import load_compressed, save_params
from lmos_jax.models.gpt import GPT
from lmos_jax.models.layers import TransformerConfig
from lmos_jax.train.losses import lm_loss


def tiny(scan=True):
  cfg = TransformerConfig(vocab_size=40, num_layers=2, num_heads=4, d_model=32, d_ff=64,
                          max_seq_len=16, scan_layers=scan)
  graphdef, state = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)))
  return graphdef, state.to_pure_dict()


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (8, 16), (4, 8)])
def test_roundtrip_error_within_half_step_per_channel(bits, group):
  w = jax.random.normal(jax.random.PRNGKey(bits + group), (3, 32, 4, 5))  # (L, in, N, H)
  lay = KernelLayout(batch_ndim=1, in_ndim=1)
  qa = quantize_kernel(w, lay, bits, group)
  err = np.abs(np.asarray(dequantize_kernel(qa)) - np.asarray(w)).reshape(3, 32, 20)
  # independent scale: absmax over each (layer, input group, output channel) / qmax
  g = 32 if group == 0 else group
  wv = np.asarray(w).reshape(3, 32 // g, g, 20)
  amax = np.abs(wv).max(axis=2, keepdims=True)
  step = amax / (2 ** (bits - 1) - 1)
  # f32: a rounded w / scale may fall on the other side of a half step (off by eps/2 * |w|)
  # and q * scale rounds once more (eps/2 * |w|): step/2 plus up to eps*amax; allow 2 eps*amax
  bound = np.broadcast_to(step / 2 + 2 * np.finfo(np.float32).eps * amax, wv.shape)
  assert np.all(err <= bound.reshape(3, 32, 20))
  assert err.max() > 0  # it did quantize
  assert qa.q.dtype == (jnp.uint8 if bits == 4 else jnp.int8)


def test_int4_packing_roundtrip_and_size():
  q = jnp.arange(-7, 8, dtype=jnp.int8)  # 15 codes: odd length pads one nibble
  packed = pack_int4(q)
  assert packed.shape == (8,) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(unpack_int4(packed, 15)), np.asarray(q))


def test_quantized_model_saves_loads_and_runs(tmp_path):
  graphdef, params = tiny(scan=False)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 40)
  ref = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)
  sizes = {}
  # int8 / int4 per group of 8: each weight is off by <= step/2 = absmax/254 (0.4%) / absmax/14
  # (7%) of its group's largest; two layers of dot products compound that: 0.02 / 0.3 of the
  # largest logit (not f32 noise: these bound the quantization itself)
  for bits, tol in [(8, 0.02), (4, 0.3)]:
    qp = quantize_params(graphdef, params, bits, group_size=8)
    n_q = sum(isinstance(x, QArray) for x in jax.tree.leaves(
        qp, is_leaf=lambda x: isinstance(x, QArray)))
    assert n_q == 2 * 6  # q, k, v, out, up, down per layer
    size = save_params(qp, tmp_path / f"int{bits}.safetensors")
    loaded, _ = load_compressed(tmp_path / f"int{bits}.safetensors")
    assert isinstance(loaded["blocks"][1]["mlp"]["up"]["kernel"], QArray)
    out = jax.jit(lambda p, t: nnx.merge(graphdef, dequantize_params(p))(t))(loaded, tokens)
    rel = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert 0 < rel < tol, (bits, rel)
    sizes[bits] = size
    assert param_bytes(qp) < param_bytes(params)
  # embeddings, norms and the JSON header stay; kernels shrink 4x (int8) and 8x (int4)
  dense_size = save_params(params, tmp_path / "dense.safetensors")
  assert sizes[8] < 0.6 * dense_size and sizes[4] < sizes[8] - 16384 // 4


def test_fake_quant_straight_through_and_qat_loss():
  lay = KernelLayout(0, 1)
  w = jax.random.normal(jax.random.PRNGKey(0), (16, 8))
  out, vjp = jax.vjp(lambda x: fake_quant(x, lay, 4, 0), w)
  # w + (wq - w) equals wq up to two f32 roundings of values <= |wq| (<= eps = 1.2e-7 rel):
  # rtol 1e-6 ~ 8 eps; where wq = 0 the sum w + (0 - w) is exactly 0, so atol is a spare floor
  np.testing.assert_allclose(np.asarray(out),
                             np.asarray(dequantize_kernel(quantize_kernel(w, lay, 4))),
                             rtol=1e-6, atol=1e-6)
  ct = jax.random.normal(jax.random.PRNGKey(1), w.shape)
  np.testing.assert_array_equal(np.asarray(vjp(ct)[0]), np.asarray(ct))  # identity grad
  graphdef, params = tiny()
  batch = {"inputs": jnp.ones((2, 16), jnp.int32), "targets": jnp.ones((2, 16), jnp.int32)}
  loss_q = qat_loss(lm_loss, graphdef, params, bits=4)

  def value(p, fn):
    return fn(nnx.merge(graphdef, p), batch, None)[0]

  @jax.jit
  def check(p):
    qp = dequantize_params(quantize_params(graphdef, p, 4))
    return value(p, loss_q), value(qp, lm_loss), jax.grad(value)(p, loss_q)
  with_qat, quantized, grads = check(params)
  # the fake-quantized kernels equal the dequantized ones within ~1 ulp (above), in a program
  # that also takes the gradient: the loss (~3.7) moves by ~1e-6 relative; rtol 1e-5 ~ 80 eps
  np.testing.assert_allclose(float(with_qat), float(quantized), rtol=1e-5)
  assert float(jnp.abs(grads["blocks"]["mlp"]["up"]["kernel"]).sum()) > 0
  assert kernel_layouts(graphdef, params)[("blocks", "attn", "out", "kernel")].in_ndim == 2
