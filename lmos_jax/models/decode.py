"""KV-cache decoding: prefill a fixed-size cache, then one compiled `lax.while_loop`.

The cache is one array per K and V of shape (L, B, S_max, K, H), a leading layers axis the
stacked (scan_layers) model scans together with the layer state, or, when the layers run
unrolled, one (B, S_max, K, H) array per layer. On CPU the decoder unrolls a stacked model's
layers (`unroll_default`): XLA:CPU's dot cannot read one layer's slice of a stacked kernel
in place, so a scanned step copies every kernel once per token, over half of GPT-2's
batch-1 step; `layer_states` slices the layers once per call, outside the token loop, and
the loop's dots read each layer's weights where they lie. Prompts of different
lengths are right-padded; every row keeps its own length, so positions equal slot indices
and a row never attends to a padding slot (causal by slot, and a padding slot is overwritten
before any query can see it). Sampling settings and the token budget are traced values, so
one compilation serves every setting; only the (batch, prompt) bucket and S_max are shapes.

Each row ends with an explicit status: a stop token, its token budget, or a full cache
(`cache_full`: the row wanted more tokens than S_max leaves room for). Nothing is truncated
silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmos_jax.parallel.sharding import batch_sharding, constrain

Array = jax.Array

STATUS = ("running", "stop_token", "max_new_tokens", "cache_full")
RUNNING, STOP_TOKEN, MAX_NEW_TOKENS, CACHE_FULL = range(4)
CACHE_NAMES = ("layers", "batch", "cache_length", "act_kv_heads", "head_dim")


# ----------------------------------------------------------------------------- sampling

def filter_logits(logits_BV: Array, top_k: Array, top_p: Array, min_p: Array) -> Array:
  """Logits with -inf outside the top-k / top-p (nucleus) / min-p support, applied in turn.

  top_k <= 0, top_p >= 1 and min_p <= 0 switch a filter off. Ties at a threshold are kept.
  """
  logits_BV = logits_BV.astype(jnp.float32)
  v = logits_BV.shape[-1]
  neg = jnp.float32(-jnp.inf)
  sorted_BV = -jnp.sort(-logits_BV, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v).astype(jnp.int32)
  kth_B1 = jax.lax.dynamic_slice_in_dim(sorted_BV, k - 1, 1, axis=-1)
  logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, neg)
  probs_BV = jax.nn.softmax(logits_BV, axis=-1)
  sorted_p_BV = -jnp.sort(-probs_BV, axis=-1)
  before_BV = jnp.cumsum(sorted_p_BV, axis=-1) - sorted_p_BV  # mass strictly above each
  kept_BV = (before_BV < top_p) | (jnp.arange(v) == 0)
  thresh_B1 = jnp.min(jnp.where(kept_BV, sorted_p_BV, jnp.inf), axis=-1, keepdims=True)
  keep_BV = (probs_BV >= thresh_B1) & (probs_BV >= min_p * probs_BV.max(-1, keepdims=True))
  return jnp.where(keep_BV & (probs_BV > 0), logits_BV, neg)


def sample_next(logits_BV: Array, key: Array, temperature: Array, top_k: Array, top_p: Array,
                min_p: Array) -> Array:
  """Greedy (argmax) when temperature <= 0, else a draw from the filtered distribution."""
  greedy_B = jnp.argmax(logits_BV, axis=-1)

  def draw():
    scaled_BV = logits_BV.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    return jax.random.categorical(key, filter_logits(scaled_BV, top_k, top_p, min_p))
  # The filters sort the vocabulary (at GPT-2's 50k a fifth of a batch-1 decode step on
  # CPU): skipped when every row is greedy, which changes no token.
  drawn_B = jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy_B)
  return jnp.where(temperature > 0, drawn_B, greedy_B).astype(jnp.int32)


# ----------------------------------------------------------------------------- cached model

def check_cache_len(cfg, cache_len: int) -> None:
  """Learned position tables end at max_seq_len: a longer cache would read past them."""
  if cfg.pos_emb == "learned" and cache_len > cfg.max_seq_len:
    raise ValueError(f"cache_len={cache_len} exceeds the model's learned positions "
                     f"(max_seq_len={cfg.max_seq_len}); use cache_len <= {cfg.max_seq_len}")


def init_cache(cfg, batch: int, cache_len: int, dtype: Any, per_layer: bool | None = None
               ) -> dict[str, Array | list[Array]]:
  """Zeroed K and V caches with logical axis names: stacked (L, B, S_max, K, H) for a
  scanned model, else (per_layer, the default for an unrolled one) a list of L arrays
  (B, S_max, K, H), so each layer reads and writes its own buffer in place."""
  per_layer = not cfg.scan_layers if per_layer is None else per_layer
  shape = (batch, cache_len, cfg.kv_heads, cfg.head_dim)
  if per_layer:
    return {n: [constrain(jnp.zeros(shape, dtype), CACHE_NAMES[1:])
                for _ in range(cfg.num_layers)] for n in ("k", "v")}
  return {n: constrain(jnp.zeros((cfg.num_layers, *shape), dtype), CACHE_NAMES)
          for n in ("k", "v")}


def unroll_default() -> bool:
  """Whether decoding unrolls a stacked model's layers on the default backend: on CPU
  (see the module docstring); GPU and TPU compilers read a scanned layer's weights in place,
  and a scan compiles one layer instead of L."""
  return jax.default_backend() == "cpu"


def layer_states(model) -> list | None:
  """A stacked model's per-layer states, each sliced out of the stack once (None for an
  unrolled model). Call it outside the token loop: inside, the slices would be redone, and
  copied, every step."""
  if not model.cfg.scan_layers:
    return None
  state = nnx.state(model.blocks)
  return [jax.tree.map(lambda x, i=i: x[i], state) for i in range(model.cfg.num_layers)]


def _write(cache_BSKH: Array, new_BTKH: Array, start_B: Array) -> Array:
  """Writes each row's T new entries at its own slot offset."""
  put = lambda c, x, s: jax.lax.dynamic_update_slice_in_dim(c, x, s, axis=0)  # noqa: E731
  out = jax.vmap(put)(cache_BSKH, new_BTKH.astype(cache_BSKH.dtype), start_B)
  return constrain(out, CACHE_NAMES[1:])


def _block_cached(block, x_BTD: Array, positions_BT: Array, mask_B1TS: Array, k_BSKH: Array,
                  v_BSKH: Array, start_B: Array):
  """One layer (`Block.wire`, without dropout) whose attention reads and writes the cache."""

  def attend(h_BTD):
    q, k, v = block.attn.project_qkv(h_BTD, positions_BT)
    k_new, v_new = _write(k_BSKH, k, start_B), _write(v_BSKH, v, start_B)
    out = block.attn.attend(q, k_new.astype(q.dtype), v_new.astype(q.dtype), mask_B1TS,
                            is_causal=False, dropout_key=None)
    return out, (k_new, v_new)

  x_BTD, (k_BSKH, v_BSKH) = block.wire(x_BTD, attend)
  return x_BTD, k_BSKH, v_BSKH


def hidden_cached(model, tokens_BT: Array, start_B: Array, cache: dict[str, Any],
                  layers: list | None = None) -> tuple[Array, dict[str, Any]]:
  """Runs T new tokens per row at slots start_B.. : final hidden states (B, T, D) and the
  cache with their K/V written. Slots past a row's valid length are never read before they
  are rewritten, so moving a row's length back is all a rollback needs.

  A per-layer cache (a list, see `init_cache`) runs the layers unrolled: a stacked model's
  from `layers` (its `layer_states`, sliced here when not given), an unrolled model's own.
  """
  cfg = model.cfg
  b, t = tokens_BT.shape
  per_layer = isinstance(cache["k"], (list, tuple))
  s = cache["k"][0].shape[1] if per_layer else cache["k"].shape[2]
  positions_BT = start_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  mask_B1TS = (jnp.arange(s)[None, None, :] <= positions_BT[:, :, None])[:, None]
  # A slot past the learned position table (only a speculative chunk near the end of the
  # cache writes one, for tokens never kept) reads the last row instead of take's NaN fill:
  # its K/V must stay finite, as a masked slot's zero weight times NaN is NaN.
  table_BT = (jnp.minimum(positions_BT, cfg.max_seq_len - 1) if cfg.pos_emb == "learned"
              else positions_BT)
  x_BTD = model.embed_tokens(tokens_BT, table_BT, model.dtype)
  if cfg.scan_layers and not per_layer:
    graphdef, state = nnx.split(model.blocks)

    def body(x, xs):
      layer_state, k_c, v_c = xs
      x, k_c, v_c = _block_cached(nnx.merge(graphdef, layer_state), x, positions_BT,
                                  mask_B1TS, k_c, v_c, start_B)
      return x, (k_c, v_c)

    x_BTD, (k, v) = jax.lax.scan(body, x_BTD, (state, cache["k"], cache["v"]))
    return x_BTD, {"k": constrain(k, CACHE_NAMES), "v": constrain(v, CACHE_NAMES)}
  if cfg.scan_layers:
    graphdef = nnx.graphdef(model.blocks)
    blocks = [nnx.merge(graphdef, st) for st in (layers or layer_states(model))]
  else:
    blocks = list(model.blocks)
  ks, vs = [], []
  for block, k_c, v_c in zip(blocks, cache["k"], cache["v"]):
    x_BTD, k_c, v_c = _block_cached(block, x_BTD, positions_BT, mask_B1TS, k_c, v_c, start_B)
    ks.append(k_c)
    vs.append(v_c)
  return x_BTD, {"k": ks, "v": vs}


def forward_cached(model, tokens_BT: Array, start_B: Array, cache: dict[str, Any],
                   last_B: Array, layers: list | None = None) -> tuple[Array, dict[str, Any]]:
  """Runs T new tokens per row at slots start_B.. and returns logits at index last_B only."""
  x_BTD, cache = hidden_cached(model, tokens_BT, start_B, cache, layers)
  x_B1D = jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)
  return model.logits(x_B1D)[:, 0], cache


def forward_cached_all(model, tokens_BT: Array, start_B: Array, cache: dict[str, Any],
                       layers: list | None = None) -> tuple[Array, dict[str, Any]]:
  """Like `forward_cached`, with the logits of all T new tokens (B, T, V): a verify chunk."""
  x_BTD, cache = hidden_cached(model, tokens_BT, start_B, cache, layers)
  return model.logits(x_BTD), cache


# ----------------------------------------------------------------------------- decode loop

@dataclasses.dataclass(frozen=True)
class Sampling:
  """Sampling settings; all traced, so changing them never recompiles."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0

  def arrays(self) -> tuple[Array, ...]:
    return (jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p),
            jnp.float32(self.min_p))


def step_tokens(buf_BS, cur_B, n_gen_B, done_B, status_B, tok_B, max_new_B, stop_E, s):
  """Appends each active row's token and decides which rows finish, and why."""
  active_B = ~done_B
  write_BS = jax.nn.one_hot(jnp.minimum(cur_B, s - 1), s, dtype=jnp.bool_) & active_B[:, None]
  buf_BS = jnp.where(write_BS, tok_B[:, None], buf_BS)
  n_gen_B = n_gen_B + active_B
  cur_B = cur_B + active_B
  hit_stop = active_B & jnp.any(tok_B[:, None] == stop_E[None, :], axis=-1)
  hit_max = active_B & ~hit_stop & (n_gen_B >= max_new_B)
  full = active_B & ~hit_stop & ~hit_max & (cur_B >= s)
  status_B = jnp.where(hit_stop, STOP_TOKEN, jnp.where(hit_max, MAX_NEW_TOKENS,
                                                       jnp.where(full, CACHE_FULL, status_B)))
  return buf_BS, cur_B, n_gen_B, done_B | hit_stop | hit_max | full, status_B


def initial_status(lengths_B, max_new_B, s):
  """(done, status) of each row before its first token: rows asked for no tokens, or whose
  prompt already fills the cache, are done from the start."""
  status_B = jnp.where(max_new_B <= 0, MAX_NEW_TOKENS,
                       jnp.where(lengths_B >= s, CACHE_FULL, RUNNING)).astype(jnp.int32)
  return status_B != RUNNING, status_B


def decode_loop(graphdef, params, tokens_BP: Array, lengths_B: Array, max_new_B: Array,
                stop_E: Array, sampling: tuple[Array, ...], key: Array, cache_len: int,
                unroll: bool = False):
  """Prefill + while_loop decode. Returns (tokens (B, S_max), lengths, generated, status).

  `unroll` runs a stacked model's layers unrolled over per-layer caches (see the module
  docstring); the result is the same either way.
  """
  b, p = tokens_BP.shape
  s = cache_len
  model = nnx.merge(graphdef, params)
  check_cache_len(model.cfg, s)
  layers = layer_states(model) if unroll else None
  cache = init_cache(model.cfg, b, s, model.dtype, per_layer=unroll or None)
  zeros_B = jnp.zeros((b,), jnp.int32)
  logits_BV, cache = forward_cached(model, tokens_BP, zeros_B, cache,
                                    jnp.maximum(lengths_B - 1, 0), layers)
  buf_BS = jnp.pad(tokens_BP, ((0, 0), (0, s - p)))
  done_B, status_B = initial_status(lengths_B, max_new_B, s)

  def cond(carry):
    return jnp.any(~carry[3])

  def body(carry):
    buf, cur, n_gen, done, status, logits, cache, key = carry
    key, sub = jax.random.split(key)
    tok_B = sample_next(logits, sub, *sampling)
    pos_B = jnp.minimum(cur, s - 1)
    buf, cur, n_gen, done, status = step_tokens(buf, cur, n_gen, done, status, tok_B,
                                                 max_new_B, stop_E, s)
    logits, cache = forward_cached(model, tok_B[:, None], pos_B, cache, zeros_B, layers)
    return buf, cur, n_gen, done, status, logits, cache, key

  carry = (buf_BS, lengths_B, zeros_B, done_B, status_B, logits_BV, cache, key)
  buf_BS, cur_B, n_gen_B, _, status_B, _, _, _ = jax.lax.while_loop(cond, body, carry)
  return buf_BS, cur_B, n_gen_B, status_B


def full_recompute_loop(graphdef, params, tokens_BP: Array, lengths_B: Array,
                        max_new_B: Array, stop_E: Array, sampling: tuple[Array, ...],
                        key: Array, cache_len: int, unroll: bool = False):
  """The no-cache decoder: every step reruns the model over the whole (B, S_max) buffer.

  Same loop, statuses and sampling as `decode_loop`; the reference it must equal greedily
  (`unroll` is accepted for the same signature; a full forward has no per-token cache).
  """
  b, p = tokens_BP.shape
  s = cache_len
  check_cache_len(nnx.merge(graphdef, params).cfg, s)
  buf_BS = jnp.pad(tokens_BP, ((0, 0), (0, s - p)))

  def last_logits(buf, cur):
    logits_BSV = nnx.merge(graphdef, params)(buf)
    idx = jnp.maximum(cur - 1, 0)
    return jnp.take_along_axis(logits_BSV, idx[:, None, None], axis=1)[:, 0]

  done_B, status_B = initial_status(lengths_B, max_new_B, s)

  def cond(carry):
    return jnp.any(~carry[3])

  def body(carry):
    buf, cur, n_gen, done, status, key = carry
    key, sub = jax.random.split(key)
    tok_B = sample_next(last_logits(buf, cur), sub, *sampling)
    buf, cur, n_gen, done, status = step_tokens(buf, cur, n_gen, done, status, tok_B,
                                                 max_new_B, stop_E, s)
    return buf, cur, n_gen, done, status, key

  zeros_B = jnp.zeros((b,), jnp.int32)
  carry = (buf_BS, lengths_B, zeros_B, done_B, status_B, key)
  buf_BS, cur_B, n_gen_B, _, status_B, _ = jax.lax.while_loop(cond, body, carry)
  return buf_BS, cur_B, n_gen_B, status_B


# ----------------------------------------------------------------------------- host API

@dataclasses.dataclass
class Generation:
  """Per-row new tokens (stop token included when hit) and why each row ended."""

  tokens: list[np.ndarray]
  status: list[str]


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
  """Next power of two >= n (at least `minimum`, at most `maximum`): the compile buckets."""
  size = max(minimum, 1 << max(n - 1, 0).bit_length())
  return size if maximum is None else min(size, maximum)


class Decoder:
  """A model's compiled generate: one compilation per (batch, prompt-length) bucket.

  With `mesh`, batches are split over data/fsdp and the cache follows its logical names;
  params should already be placed. `unroll_layers` (default: `unroll_default()`, i.e. on
  CPU) runs a stacked model's layers unrolled, each reading its own weights in place.
  """

  def __init__(self, graphdef, cache_len: int, *, mesh=None, use_cache: bool = True,
               unroll_layers: bool | None = None):
    self.graphdef, self.cache_len, self.mesh = graphdef, int(cache_len), mesh
    loop = decode_loop if use_cache else full_recompute_loop
    unroll = unroll_default() if unroll_layers is None else unroll_layers

    self._traces = 0

    def run(params, tokens, lengths, max_new, stop, sampling, key):
      self._traces += 1  # runs only while tracing, i.e. once per compiled shape bucket
      return loop(graphdef, params, tokens, lengths, max_new, stop, sampling, key,
                  self.cache_len, unroll)

    self._fn = jax.jit(run)

  def compiled_count(self) -> int:
    """How many shape buckets have been traced (and so compiled) so far."""
    return self._traces

  def generate(self, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
               sampling: Sampling = Sampling(), stop_tokens: Sequence[int] = (),
               seed: int = 0) -> Generation:
    """Generates for a batch of token-id prompts of any lengths (each at least 1 token)."""
    split = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    args = pack_prompts(prompts, max_new_tokens, stop_tokens, self.cache_len, split)
    rows = args[:3]
    if self.mesh is not None:
      rows = tuple(jax.device_put(a, batch_sharding(self.mesh, a.ndim)) for a in rows)
      with jax.set_mesh(self.mesh):
        out = self._fn(params, *rows, args[3], sampling.arrays(), jax.random.PRNGKey(seed))
    else:
      out = self._fn(params, *rows, args[3], sampling.arrays(), jax.random.PRNGKey(seed))
    return unpack(prompts, *jax.device_get(out))


def pack_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stop_tokens: Sequence[int], cache_len: int, split: int = 1
                 ) -> tuple[np.ndarray, ...]:
  """(tokens (B, P), lengths, max_new, stop) padded to the compile buckets; bad sizes raise.

  Batch rows past the prompts get one token and a zero budget, so they finish at once.
  """
  lens = [len(p) for p in prompts]
  if not prompts or min(lens) < 1:
    raise ValueError("generate: every prompt needs at least one token (e.g. a BOS/newline)")
  if max(lens) > cache_len:
    raise ValueError(f"generate: a prompt has {max(lens)} tokens but the cache holds "
                     f"{cache_len}; shorten it or raise cache_len")
  if max_new_tokens < 0:
    raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 0")
  b = -(-bucket(len(prompts), 1) // split) * split  # a power of two, then whole shards
  p = bucket(max(lens), 8, cache_len)
  tokens = np.zeros((b, p), np.int32)
  for i, row in enumerate(prompts):
    tokens[i, :len(row)] = row
  lengths = np.ones((b,), np.int32)
  lengths[:len(prompts)] = lens
  max_new = np.zeros((b,), np.int32)
  max_new[:len(prompts)] = max_new_tokens
  stop = np.full((bucket(len(stop_tokens), 4),), -1, np.int32)
  stop[:len(stop_tokens)] = list(stop_tokens)
  return tokens, lengths, max_new, stop


def unpack(prompts: Sequence[Sequence[int]], buf_BS, cur_B, n_gen_B, status_B) -> Generation:
  """Each prompt's new tokens and status out of the padded device buffers."""
  buf, n_gen, status = np.asarray(buf_BS), np.asarray(n_gen_B), np.asarray(status_B)
  lens = [len(p) for p in prompts]
  rows = range(len(prompts))
  return Generation(tokens=[buf[i, lens[i]:lens[i] + n_gen[i]] for i in rows],
                    status=[STATUS[int(status[i])] for i in rows])
