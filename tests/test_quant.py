"""Weight-only quantization: error bounds, int4 packing, save/load as quantized, QAT's STE;
bfloat16 kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmos_jax.compress.kernels import KernelLayout, kernel_layouts
from lmos_jax.compress.quantize import (bf16_kernels, dequantize_kernel, dequantize_params,
                                         fake_quant, param_bytes, qat_loss, quantize_kernel,
                                         quantize_params)
from lmos_jax.models.decode import Decoder
from lmos_jax.models.quantized import QArray, pack_halves, unpack_halves
from lmos_jax.compress.store import load_compressed, save_params
from lmos_jax.models.gpt import GPT
from lmos_jax.models.layers import TransformerConfig, kernel_matmul
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
  qa = quantize_kernel(w, lay, bits, group, clip_search=False)  # plain absmax
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
  assert qa.q.dtype == jnp.int8 and qa.q.shape == (3, 32 if bits == 8 else 16, 20)
  assert qa.shape == w.shape and qa.scale.shape == (3, 32 // g, 20)


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 32)])
def test_clip_search_lowers_the_error_of_every_group(bits, group):
  # Gaussian weights with a heavy tail: the least-squares clip of each (input group, output)
  # is never worse than absmax (absmax is one of the candidates)
  k1, k2 = jax.random.split(jax.random.PRNGKey(bits))
  w = jax.random.normal(k1, (128, 48)) * jnp.where(jax.random.uniform(k2, (128, 48)) < 0.02,
                                                   6.0, 1.0)
  lay = KernelLayout(batch_ndim=0, in_ndim=1)
  g = 128 if group == 0 else group
  def sq_err(qa):
    return ((np.asarray(qa.dequantize()) - np.asarray(w)) ** 2).reshape(128 // g, g, 48).sum(1)
  searched = sq_err(quantize_kernel(w, lay, bits, group))
  absmax = sq_err(quantize_kernel(w, lay, bits, group, clip_search=False))
  assert np.all(searched <= absmax * (1 + 1e-6))
  if bits == 4:  # 15 levels: the clip matters (at 8 bits absmax is usually the best ratio)
    assert searched.sum() < 0.97 * absmax.sum()


def test_int4_packing_roundtrip_and_size():
  q = jnp.arange(-8, 8, dtype=jnp.int8).reshape(2, 8, 1)
  q = jnp.concatenate([q, 7 - q - 8], axis=-1)  # every code in [-8, 7], in both halves
  packed = pack_halves(q)
  assert packed.shape == (2, 4, 2) and packed.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(unpack_halves(packed)), np.asarray(q))


@pytest.mark.parametrize("bits,group,in_shape,out_shape",
                         [(8, 0, (64,), (48,)), (8, 16, (64,), (48,)), (4, 0, (64,), (48,)),
                          (4, 8, (4, 16), (48,)), (4, 16, (64,), (3, 16))])
def test_quantized_matmul_equals_the_dequantized_reference(bits, group, in_shape, out_shape):
  # A numpy reference from the codes and scales alone: w = codes * scale per (group, output)
  w = jax.random.normal(jax.random.PRNGKey(bits * group + 1), (*in_shape, *out_shape))
  qa = quantize_kernel(w, KernelLayout(batch_ndim=0, in_ndim=len(in_shape)), bits, group)
  i, o = int(np.prod(in_shape)), int(np.prod(out_shape))
  codes = np.asarray(unpack_halves(qa.q) if bits == 4 else qa.q).astype(np.float64)
  g = i if group == 0 else group
  w_ref = (codes.reshape(i // g, g, o) * np.asarray(qa.scale, np.float64)[:, None]).reshape(i, o)
  np.testing.assert_array_equal(np.asarray(qa.dequantize()).reshape(i, o),
                                w_ref.astype(np.float32))
  x = jax.random.normal(jax.random.PRNGKey(7), (5, 3, *in_shape))
  y = np.asarray(jax.jit(qa.matmul)(x)).reshape(15, o)
  y_ref = np.asarray(x, np.float64).reshape(15, i) @ w_ref
  # f32 dot of 64 terms |x w| <= ~4: a few ulps of the sum of |terms| (~1e-5); atol 1e-4
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)
  assert y.shape == (15, o) and np.abs(y_ref).max() > 1


def test_quantized_model_saves_loads_and_runs(tmp_path):
  graphdef, params = tiny(scan=False)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 40)
  ref = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)
  sizes = {}
  # int8 / int4 per group of 8: each weight is off by <= step/2 = absmax/254 (0.4%) / absmax/14
  # (7%) of its group's largest; two layers of dot products compound that: 0.02 / 0.3 of the
  # largest logit (not f32 noise: these bound the quantization itself)
  for bits, tol in [(8, 0.02), (4, 0.3)]:
    qp = quantize_params(graphdef, params, bits, group_size=8, tied_embedding=True)
    n_q = sum(isinstance(x, QArray) for x in jax.tree.leaves(
        qp, is_leaf=lambda x: isinstance(x, QArray)))
    assert n_q == 2 * 6 + 1  # q, k, v, out, up, down per layer and the tied embedding
    size = save_params(qp, tmp_path / f"int{bits}.safetensors")
    loaded, _ = load_compressed(tmp_path / f"int{bits}.safetensors")
    assert isinstance(loaded["blocks"][1]["mlp"]["up"]["kernel"], QArray)
    out = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(loaded, tokens)
    rel = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert 0 < rel < tol, (bits, rel)
    # the quantized forward (codes converted in each matmul) equals the float model made
    # from the dequantized weights: only the order of the scale multiply differs (f32 ulps)
    deq = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(dequantize_params(loaded), tokens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(deq), rtol=1e-5, atol=1e-5)
    sizes[bits] = size
    assert param_bytes(qp) < param_bytes(params)
  # norms, biases, positions and the JSON header stay; kernels and the tied table shrink
  # ~4x (int8) and ~8x (int4), less the f32 scale of every 8 weights
  dense_size = save_params(params, tmp_path / "dense.safetensors")
  assert sizes[8] < 0.6 * dense_size and sizes[4] < sizes[8] - 16384 // 4


@pytest.mark.parametrize("scan,unroll", [(True, False), (True, True), (False, None)])
def test_quantized_decoder_equals_the_dequantized_model(scan, unroll):
  # Greedy KV-cache decoding with QArrays in every layer (sliced by the layer scan, or once
  # per call when unrolled) and as the tied embedding picks the tokens the float model of
  # the dequantized weights picks.
  graphdef, params = tiny(scan=scan)
  qp = quantize_params(graphdef, params, 4, group_size=8, tied_embedding=True)
  dec = Decoder(graphdef, cache_len=16, unroll_layers=unroll)
  prompts = [[1, 2, 3], [4]]
  got = [list(map(int, t)) for t in dec.generate(qp, prompts, 12).tokens]
  want = [list(map(int, t)) for t in dec.generate(dequantize_params(qp), prompts, 12).tokens]
  assert got == want and all(len(t) == 12 for t in got)


def test_bf16_kernel_matmul_rounds_only_its_operands():
  # a bf16 kernel under f32 activations: the product of the bf16-rounded operands, summed in
  # f32 (64 terms: ~1e-6 relative to float64); an f32 kernel keeps the f32 product
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 4, 16))  # (B, T, N, H): 2 input axes
  w = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 24))
  wb = w.astype(jnp.bfloat16)
  got = kernel_matmul(x, wb, 2)
  assert got.dtype == jnp.float32 and got.shape == (2, 5, 24)
  as64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)  # noqa: E731
  want = np.einsum("btnh,nho->bto", as64(x.astype(jnp.bfloat16)), as64(wb))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  full = np.einsum("btnh,nho->bto", as64(x), as64(w))
  np.testing.assert_allclose(np.asarray(kernel_matmul(x, w, 2)), full, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(got) - full).max() > 1e-3  # the bf16 path did round


@pytest.mark.parametrize("scan", [True, False])
def test_bf16_kernels_model_runs_near_its_rounded_weights(scan, tmp_path):
  # kernels stored bf16, the rest f32; saved and loaded as bf16; the forward (a layer scan
  # slices the kernels as bit patterns) differs from the f32 model of the same rounded
  # kernels only by rounding each matmul's activations to bf16 (2^-9 relative per element,
  # averaging out over each sum; ~4e-4 of the largest logit here): < 1%, and not 0 (the bf16
  # dot ran)
  graphdef, params = tiny(scan=scan)
  bp = bf16_kernels(graphdef, params)
  kernels = [x for p, x in jax.tree_util.tree_flatten_with_path(bp)[0]
             if "kernel" in jax.tree_util.keystr(p)]
  assert len(kernels) == (6 if scan else 2 * 6)  # q, k, v, out, up, down (stacked or not)
  assert all(k.dtype == jnp.bfloat16 for k in kernels) and bp["embed"].dtype == jnp.float32
  save_params(bp, tmp_path / "bf16.safetensors")
  loaded, _ = load_compressed(tmp_path / "bf16.safetensors")
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 40)
  fwd = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
  out = fwd(jax.tree.map(jnp.asarray, loaded), tokens)
  rounded = fwd(jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.float32), loaded), tokens)
  rel = float(jnp.abs(out - rounded).max() / jnp.abs(rounded).max())
  assert 0 < rel < 0.01, rel
  assert param_bytes(bp) < param_bytes(params)


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
