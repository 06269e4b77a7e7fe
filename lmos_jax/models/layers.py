"""Transformer building blocks shared by the decoder (GPT/Llama) and the encoder (BERT).

Every parameter carries logical axis names (`out_sharding` metadata) that
`lmos_jax.parallel.sharding` maps onto mesh axes; key activations are constrained with
logical names too. Modules hold parameters only: dropout keys and positions are passed in,
so a model can be split/merged and called under a plain `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lmos_jax.config.loading import ConfigError
from lmos_jax.config.schema import CHOICES
from lmos_jax.models.quantized import is_qarray
from lmos_jax.parallel.sharding import constrain

Array = jax.Array
Names = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Static shape and architecture choices of one transformer stack."""

  vocab_size: int
  num_layers: int
  num_heads: int
  d_model: int
  d_ff: int
  max_seq_len: int
  num_kv_heads: int = 0
  pos_emb: str = "learned"  # learned | rope | none
  rope_theta: float = 10000.0
  norm: str = "layernorm"  # layernorm | rmsnorm
  norm_eps: float = 1e-5
  norm_position: str = "pre"  # pre (GPT/Llama) | post (BERT)
  mlp: str = "gelu"  # gelu | gelu_exact | swiglu
  use_bias: bool = True
  tie_embeddings: bool = True
  dropout: float = 0.0
  scan_layers: bool = True
  remat: str = "none"
  attention_impl: str = "auto"
  init_std: float = 0.02
  type_vocab_size: int = 0  # BERT token types; 0 for decoders
  num_labels: int = 0  # classification head width; 0 for none
  pooling: str = "cls"  # BERT classifier's sentence vector: cls (pooler) | mean (of tokens)

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


def param(rngs: nnx.Rngs, init: Callable[..., Array], shape: tuple[int, ...],
          names: Names, dtype: Any = jnp.float32) -> nnx.Param:
  """A parameter with logical axis names; placement is decided later by jit shardings."""
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names,
                   eager_sharding=False)


def normal(std: float) -> Callable[..., Array]:
  return jax.nn.initializers.normal(stddev=std)


@jax.custom_vjp
def logits_matmul(x_BTD: Array, w_DV: Array) -> Array:
  """x @ w with float32 accumulation and output (the loss needs float32 logits).

  The backward matmuls run in the operands' dtype: plain autodiff would transpose this dot
  with the float32 cotangent and so promote the LM head's two backward matmuls (a large
  share of a model's FLOPs when the vocabulary is large) to float32 under a bf16 policy.
  """
  return jnp.einsum("btd,dv->btv", x_BTD, w_DV, preferred_element_type=jnp.float32)


def _logits_matmul_fwd(x_BTD: Array, w_DV: Array):
  return logits_matmul(x_BTD, w_DV), (x_BTD, w_DV)


def _logits_matmul_bwd(res, g_BTV: Array):
  x_BTD, w_DV = res
  g_BTV = g_BTV.astype(x_BTD.dtype)
  dx = jnp.einsum("btv,dv->btd", g_BTV, w_DV, preferred_element_type=jnp.float32)
  dw = jnp.einsum("btd,btv->dv", x_BTD, g_BTV, preferred_element_type=jnp.float32)
  return dx.astype(x_BTD.dtype), dw.astype(w_DV.dtype)


logits_matmul.defvjp(_logits_matmul_fwd, _logits_matmul_bwd)


def dropout(x: Array, rate: float, key: Array | None) -> Array:
  """Inverted dropout; a no-op when `key` is None (evaluation) or rate is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))



def kernel_matmul(x: Array, w: Array, in_ndim: int) -> Array:
  """x (..., in...) @ w (in..., out...) contracting x's last `in_ndim` axes.

  bf16 operands with float32 accumulation and output, where asked for: on CPUs with
  AVX512-BF16, XLA's dot of that form ran 1.9x its float32 dot at a served MiniLM's shapes
  (640x384 @ 384x1536), while its bf16-output dot ran slower than float32. Asked for by
  - a kernel stored in bfloat16 under float32 activations (a `lmos compress --method bf16`
    run);
  - float32 operands traced under JAX's "bfloat16" matmul precision (the `bf16_matmul`
    training policy; XLA:CPU ignores that setting itself): `bf16_operand_matmul`, whose
    gradients are float32.
  Otherwise the kernel is cast to the activations' dtype (the precision policy decides it).
  """
  if w.dtype == jnp.bfloat16 and x.dtype == jnp.float32:
    return _bf16_dot(x, w, in_ndim)
  if (x.dtype == w.dtype == jnp.float32
      and jax.config.jax_default_matmul_precision == "bfloat16"):
    return bf16_operand_matmul(x, w, in_ndim)
  axes = (tuple(range(x.ndim - in_ndim, x.ndim)), tuple(range(in_ndim)))
  return jnp.tensordot(x, w.astype(x.dtype), axes=axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bf16_operand_matmul(x: Array, w: Array, in_ndim: int) -> Array:
  """float32 x @ float32 w on bf16-rounded operands, summed in float32, in both passes.

  Plain autodiff of the forward dot would transpose it with the float32 cotangent and run
  the two backward matmuls on float32 (or mixed) operands; here the cotangent is rounded
  to bf16 too, and the gradients come back in float32 for the float32 master weights.
  """
  return _bf16_dot(x, w, in_ndim)


def _bf16_dot(x: Array, w: Array, in_ndim: int) -> Array:
  axes = (tuple(range(x.ndim - in_ndim, x.ndim)), tuple(range(in_ndim)))
  return jax.lax.dot_general(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (axes, ((), ())),
                             preferred_element_type=jnp.float32)


def _bf16_operand_fwd(x: Array, w: Array, in_ndim: int):
  x_b, w_b = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  return _bf16_dot(x_b, w_b, in_ndim), (x_b, w_b)


def _bf16_operand_bwd(in_ndim: int, res, g: Array):
  x_b, w_b = res
  g_b = g.astype(jnp.bfloat16)
  lead, out = x_b.ndim - in_ndim, w_b.ndim - in_ndim
  # dx = g . w^T over the output axes; dw = x^T . g over the leading (batch, length) axes
  dx = jax.lax.dot_general(g_b, w_b, ((tuple(range(lead, lead + out)),
                                       tuple(range(in_ndim, in_ndim + out))), ((), ())),
                           preferred_element_type=jnp.float32)
  dw = jax.lax.dot_general(x_b, g_b, ((tuple(range(lead)), tuple(range(lead))), ((), ())),
                           preferred_element_type=jnp.float32)
  return dx, dw


bf16_operand_matmul.defvjp(_bf16_operand_fwd, _bf16_operand_bwd)


class Dense(nnx.Module):
  """y = x @ W + b with a named kernel of shape (in..., out...)."""

  def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], names: Names,
               *, use_bias: bool, std: float, rngs: nnx.Rngs):
    self.in_ndim = len(in_shape)
    self.kernel = param(rngs, normal(std), (*in_shape, *out_shape), names)
    self.bias = (param(rngs, jax.nn.initializers.zeros, out_shape, names[len(in_shape):])
                 if use_bias else None)

  def __call__(self, x: Array) -> Array:
    w = self.kernel.get_value()
    if is_qarray(w):  # a compressed model's kernel: codes converted inside the matmul
      y = w.matmul(x)
    else:
      y = kernel_matmul(x, w, self.in_ndim)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y


class Norm(nnx.Module):
  """LayerNorm or RMSNorm, computed in float32 and cast back to the input dtype."""

  def __init__(self, dim: int, kind: str, eps: float, *, use_bias: bool, rngs: nnx.Rngs):
    self.kind, self.eps = kind, eps
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("norm",))
    self.bias = (param(rngs, jax.nn.initializers.zeros, (dim,), ("norm",))
                 if kind == "layernorm" and use_bias else None)

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    y = y * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def rope(x_BTNH: Array, positions_BT: Array, theta: float) -> Array:
  """Rotary embedding in the rotate-half layout used by Llama checkpoints."""
  half = x_BTNH.shape[-1] // 2
  freqs = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles_BTH = positions_BT[..., None].astype(jnp.float32) * freqs
  sin, cos = jnp.sin(angles_BTH)[:, :, None, :], jnp.cos(angles_BTH)[:, :, None, :]
  x1, x2 = x_BTNH[..., :half].astype(jnp.float32), x_BTNH[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def attention_mask(q_segment_BT: Array | None, kv_segment_BS: Array | None,
                   q_index_BT: Array | None, kv_index_BS: Array | None) -> Array | None:
  """Boolean (B, 1, T, S) mask: causal by sequence index, never across segments."""
  mask = None
  if q_index_BT is not None:
    mask = q_index_BT[:, :, None] >= kv_index_BS[:, None, :]
  if q_segment_BT is not None:
    same = q_segment_BT[:, :, None] == kv_segment_BS[:, None, :]
    mask = same if mask is None else mask & same
  return None if mask is None else mask[:, None, :, :]


def padding_mask(attention_mask_BT: Array) -> Array:
  """Hugging Face `attention_mask` (B, T) of 1 (token) / 0 (padding) -> boolean (B, 1, T, T)
  in which every query sees the real keys only (padded queries' outputs are don't-cares)."""
  b, t = attention_mask_BT.shape
  keys_B11T = (attention_mask_BT > 0)[:, None, None, :]
  return jnp.broadcast_to(keys_B11T, (b, 1, t, t))


def resolve_attention_impl(name: str) -> str:
  """'auto' -> 'blocked' on CPU (measured faster there), else the backend's fused kernel."""
  if name != "auto":
    return name
  return "blocked" if jax.default_backend() == "cpu" else "fused"


def blocked_attention(q_BNTH: Array, k_BKSH: Array, v_BKSH: Array, mask_B1TS: Array | None,
                      *, is_causal: bool, rate: float = 0.0, key: Array | None = None,
                      block: int = 128) -> Array:
  """Softmax attention in heads-major layout; causal queries skip all-masked key blocks.

  Query rows are cut into chunks of `block`; chunk i attends to keys [0, (i+1)*block) only,
  so about half the score matmuls of a long causal sequence are never computed. Heads-major
  operands make every score/value product a plain batched matmul (BTNH einsums were
  slower on CPU). Grouped-query heads are handled without repeating k and v. Dropout (on
  the probabilities, as in GPT-2) when `rate > 0` and a key is given. Returns (B, N, T, H).
  """
  b, n, t, h = q_BNTH.shape
  kv, s = k_BKSH.shape[1], k_BKSH.shape[2]
  q = (q_BNTH * (1.0 / h ** 0.5)).reshape(b, kv, n // kv, t, h)
  chunks = t // block if (is_causal and t == s and t % block == 0 and t > block) else 1
  size = t // chunks
  outs = []
  for i in range(chunks):
    stop = (i + 1) * size if chunks > 1 else s
    q_c = q[:, :, :, i * size:(i + 1) * size]
    logits = jnp.einsum("bkgth,bksh->bkgts", q_c, k_BKSH[:, :, :stop]).astype(jnp.float32)
    keep = None
    if is_causal:
      keep = (jnp.arange(size)[:, None] + i * size) >= jnp.arange(stop)[None, :]
    if mask_B1TS is not None:
      m = mask_B1TS[:, :, None, i * size:(i + 1) * size, :stop]
      keep = m if keep is None else keep & m
    if keep is not None:
      logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if rate > 0 and key is not None:
      probs = dropout(probs, rate, jax.random.fold_in(key, i))
    outs.append(jnp.einsum("bkgts,bksh->bkgth", probs.astype(v_BKSH.dtype),
                           v_BKSH[:, :, :stop]))
  o = outs[0] if chunks == 1 else jnp.concatenate(outs, axis=3)
  return o.reshape(b, n, t, h)


class Attention(nnx.Module):
  """Multi-head or grouped-query attention with optional RoPE."""

  FUSE_QKV_MIN_TOKENS = 64  # fewer tokens per call (a decode step): three matmuls

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    self.query = Dense((d,), (n, h), ("embed", "heads", "head_dim"), use_bias=cfg.use_bias,
                       std=cfg.init_std, rngs=rngs)
    self.key = Dense((d,), (k, h), ("embed", "kv_heads", "head_dim"), use_bias=cfg.use_bias,
                     std=cfg.init_std, rngs=rngs)
    self.value = Dense((d,), (k, h), ("embed", "kv_heads", "head_dim"), use_bias=cfg.use_bias,
                       std=cfg.init_std, rngs=rngs)
    self.out = Dense((n, h), (d,), ("heads", "head_dim", "embed"), use_bias=cfg.use_bias,
                     std=out_std, rngs=rngs)

  def _fusable_qkv(self, n_tokens: int) -> bool:
    """q, k, v are plain Dense of the same shape (not LoRA/quantized): one matmul does all.

    Not for a few tokens (a decode step): stacking copies the three kernels on every call,
    which costs more than the two matmul calls it saves (at GPT-2's size on CPU, 13% of a
    batch-1 decode step).
    """
    mods = (self.query, self.key, self.value)
    return (n_tokens >= self.FUSE_QKV_MIN_TOKENS
            and all(type(m) is Dense and not is_qarray(m.kernel.get_value()) for m in mods)
            and self.cfg.kv_heads == self.cfg.num_heads
            and len({m.bias is None for m in mods}) == 1)

  def project_qkv(self, x_BTD: Array, positions_BT: Array) -> tuple[Array, Array, Array]:
    cfg = self.cfg
    if self._fusable_qkv(x_BTD.shape[0] * x_BTD.shape[1]):
      # Stack the three kernels on a new (unsharded) axis: one (D, 3, N, H) matmul instead of
      # three, with the heads axis keeping its tensor-parallel sharding.
      w = jnp.stack([m.kernel[...] for m in (self.query, self.key, self.value)], axis=1)
      qkv = kernel_matmul(x_BTD, w, 1)
      if self.query.bias is not None:
        b = jnp.stack([m.bias[...] for m in (self.query, self.key, self.value)], axis=0)
        qkv = qkv + b.astype(qkv.dtype)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      q, k, v = self.query(x_BTD), self.key(x_BTD), self.value(x_BTD)
    q = constrain(q, ("batch", "length", "act_heads", "head_dim"))
    k = constrain(k, ("batch", "length", "act_kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "act_kv_heads", "head_dim"))
    if cfg.pos_emb == "rope":
      q, k = rope(q, positions_BT, cfg.rope_theta), rope(k, positions_BT, cfg.rope_theta)
    return q, k, v

  def attend(self, q, k, v, mask: Array | None, *, is_causal: bool,
             dropout_key: Array | None) -> Array:
    """Softmax attention of q (B,T,N,H) over k, v (B,S,K,H); returns (B,T,D)."""
    cfg = self.cfg
    impl = resolve_attention_impl(cfg.attention_impl)
    rate = cfg.dropout if dropout_key is not None else 0.0
    if impl == "blocked" or rate > 0:  # jax.nn.dot_product_attention has no dropout
      heads_major = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731  (B,T,N,H) <-> (B,N,T,H)
      o = heads_major(blocked_attention(heads_major(q), heads_major(k), heads_major(v), mask,
                                        is_causal=is_causal, rate=rate, key=dropout_key))
    else:
      o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                       implementation=None if impl == "fused" else impl)
    o = constrain(o, ("batch", "length", "act_heads", "head_dim"))
    return self.out(checkpoint_name(o, "attn_out"))

  def __call__(self, x_BTD: Array, positions_BT: Array, mask: Array | None, *,
               is_causal: bool, dropout_key: Array | None = None) -> Array:
    q, k, v = self.project_qkv(x_BTD, positions_BT)
    return self.attend(q, k, v, mask, is_causal=is_causal, dropout_key=dropout_key)


class MLP(nnx.Module):
  """GELU MLP (GPT/BERT) or SwiGLU (Llama)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.kind = cfg.mlp
    d, f = cfg.d_model, cfg.d_ff
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    self.up = Dense((d,), (f,), ("embed", "mlp"), use_bias=cfg.use_bias, std=cfg.init_std,
                    rngs=rngs)
    self.gate = (Dense((d,), (f,), ("embed", "mlp"), use_bias=cfg.use_bias, std=cfg.init_std,
                       rngs=rngs) if cfg.mlp == "swiglu" else None)
    self.down = Dense((f,), (d,), ("mlp", "embed"), use_bias=cfg.use_bias, std=out_std,
                      rngs=rngs)

  def __call__(self, x_BTD: Array) -> Array:
    h = self.up(x_BTD)
    if self.gate is not None:
      h = jax.nn.silu(self.gate(x_BTD)) * h
    else:
      h = jax.nn.gelu(h, approximate=self.kind != "gelu_exact")
    h = constrain(h, ("batch", "length", "act_mlp"))
    return self.down(h)


class Block(nnx.Module):
  """One transformer layer, pre-LN (GPT/Llama) or post-LN (BERT)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, use_bias=cfg.use_bias, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, use_bias=cfg.use_bias, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BTD: Array, positions_BT: Array, mask: Array | None, *,
               is_causal: bool, key: Array | None = None) -> Array:
    keys = [None] * 3 if key is None else list(jax.random.split(key, 3))

    def attend(h_BTD: Array) -> tuple[Array, None]:
      return self.attn(h_BTD, positions_BT, mask, is_causal=is_causal,
                       dropout_key=keys[0]), None

    return self.wire(x_BTD, attend, keys)[0]

  def wire(self, x_BTD: Array, attend: Callable[[Array], tuple[Array, Any]],
           keys: Sequence[Array | None] = (None, None, None)) -> tuple[Array, Any]:
    """The layer's residuals, norms and MLP around `attend` (h_BTD -> (out_BTD, aux)).

    Written once: training calls it with plain attention, the KV-cache decoder with an
    attention that also reads and writes the cache (its aux), so the two cannot drift.
    """
    cfg = self.cfg
    if cfg.norm_position == "pre":
      h, aux = attend(self.attn_norm(x_BTD))
      x_BTD = x_BTD + dropout(h, cfg.dropout, keys[1])
      h = self.mlp(self.mlp_norm(x_BTD))
      x_BTD = x_BTD + dropout(h, cfg.dropout, keys[2])
    else:
      h, aux = attend(x_BTD)
      x_BTD = self.attn_norm(x_BTD + dropout(h, cfg.dropout, keys[1]))
      h = self.mlp(x_BTD)
      x_BTD = self.mlp_norm(x_BTD + dropout(h, cfg.dropout, keys[2]))
    return constrain(x_BTD, ("batch", "length", "act_embed")), aux


def remat_policy(name: str):
  """Maps a config name to a `jax.checkpoint` policy; 'none' means no remat."""
  cp = jax.checkpoint_policies
  table = {
      "full": None,
      "dots": cp.checkpoint_dots,
      "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
      "save_attn_out": cp.save_only_these_names("attn_out"),
  }
  if name not in table:
    raise ConfigError(f"config 'model.remat'={name!r}: expected one of "
                      f"{', '.join(CHOICES['model.remat'])}")
  return table[name]


def make_blocks(cfg: TransformerConfig, rngs: nnx.Rngs):
  """Layers stacked on a leading 'layers' axis (scan) or kept as a list (unrolled)."""
  if cfg.scan_layers:
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stacked(key):
      return Block(cfg, rngs=nnx.Rngs(params=key))
    return stacked(jax.random.split(rngs.params(), cfg.num_layers))
  return nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])


def _to_bits(x: Array, was_bf16: bool) -> Array:
  """A bfloat16 array (`was_bf16`) as its uint16 bit patterns, a free bitcast; else x.

  XLA:CPU does not slice bf16 arrays in a loop natively: it converts the whole stacked
  array to f32 before the loop and each slice back to bf16 inside, which made a
  bf16-compressed MiniLM's one-question forward 4x slower than float32. Integer slices are
  native. Only for inference: bit patterns carry no gradient.
  """
  return jax.lax.bitcast_convert_type(x, jnp.uint16) if was_bf16 else x


def _from_bits(x: Array, was_bf16: bool) -> Array:
  return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if was_bf16 else x


def run_blocks(blocks, cfg: TransformerConfig, x_BTD: Array, positions_BT: Array,
               mask: Array | None, *, is_causal: bool, key: Array | None) -> Array:
  """Applies all layers, under `lax.scan` when stacked, with the configured remat."""
  keys = None if key is None else jax.random.split(key, cfg.num_layers)

  def apply(graphdef, state, x, k):
    return nnx.merge(graphdef, state)(x, positions_BT, mask, is_causal=is_causal, key=k)

  if cfg.remat != "none":
    apply = jax.checkpoint(apply, policy=remat_policy(cfg.remat), static_argnums=(0,))
  if cfg.scan_layers:
    graphdef, state = nnx.split(blocks)
    # bf16 kernels under f32 compute: a compressed run (static flags, one per leaf)
    was_bf16 = jax.tree.map(
        lambda a: x_BTD.dtype == jnp.float32 and a.dtype == jnp.bfloat16, state)

    def body(x, xs):
      layer_state, k = xs
      layer_state = jax.tree.map(_from_bits, layer_state, was_bf16)
      return apply(graphdef, layer_state, x, k), None

    xs = jax.tree.map(_to_bits, state, was_bf16)
    x_BTD, _ = jax.lax.scan(body, x_BTD, (xs, keys))
    return x_BTD
  for i, block in enumerate(blocks):
    graphdef, state = nnx.split(block)
    x_BTD = apply(graphdef, state, x_BTD, None if keys is None else keys[i])
  return x_BTD
