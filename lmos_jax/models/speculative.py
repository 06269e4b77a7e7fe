"""Speculative decoding: a small draft model proposes k tokens, the target checks them at once.

Leviathan et al. (2023), "Fast Inference from Transformers via Speculative Decoding", and
Chen et al. (2023), "Accelerating Large Language Model Decoding with Speculative Sampling".
Each round the draft runs k steps over its own KV cache; the target runs ONE forward over a
k+1-token chunk (the last committed token and the k drafts) appended to its cache, which
gives its distribution at every drafted position and one past them. Greedy decoding accepts
the longest prefix where the draft's token is the target's argmax, then adds the target's own
argmax: the output equals plain greedy decoding of the target. Sampling accepts draft token x
with probability min(1, p(x)/q(x)); on the first rejection it draws from norm(max(0, p - q)),
and when all k pass it draws a bonus token from p: every emitted token is distributed as the
target's (filtered, tempered) p, whatever the draft.

Rollback costs nothing: both caches write by slot and attend causally by slot, so a slot past
a row's committed length is never read before it is rewritten (see decode.hidden_cached).
Each row keeps only its committed length `cur`; the caches hold valid K/V for slots < cur - 1
and the last committed token is fed again at the start of the next round (the draft feeds
the two last ones, which covers the round where it accepted all k and never fed the k-th).

Everything sits in one jitted `lax.while_loop`: the draft's k steps are a `lax.fori_loop` and
the verify chunk has a fixed k+1 width, so nothing recompiles from one round to the next.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmos_jax.models.decode import (Generation, Sampling, initial_status, step_tokens,
                                    check_cache_len, filter_logits, forward_cached,
                                    forward_cached_all, init_cache, layer_states, pack_prompts,
                                    sample_next, unpack, unroll_default)
from lmos_jax.models.quantized import embedding_shape

Array = jax.Array


def filtered_probs(logits_BV: Array, temperature: Array, top_k: Array, top_p: Array,
                   min_p: Array) -> Array:
  """The distribution `sample_next` draws from at temperature > 0 (as probabilities)."""
  scaled_BV = logits_BV.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  return jax.nn.softmax(filter_logits(scaled_BV, top_k, top_p, min_p), axis=-1)


def accept_drafts(p_BKV: Array, q_BKV: Array, draft_BK: Array, target_logits_BKV: Array,
                  key: Array, temperature: Array) -> tuple[Array, Array]:
  """(accepted count n in [0, k], the token that follows them) for each row.

  p_BKV: the target's distributions at the k+1 verify positions (K = k+1); q_BKV: the
  draft's at the first k; draft_BK: the k drafted tokens. Greedy (temperature <= 0) accepts
  while the draft equals the target's argmax and follows with the target's argmax.
  """
  b, k1, v = p_BKV.shape
  k = k1 - 1
  key_u, key_r = jax.random.split(key)
  p_x_BK = jnp.take_along_axis(p_BKV[:, :k], draft_BK[..., None], axis=-1)[..., 0]
  q_x_BK = jnp.take_along_axis(q_BKV, draft_BK[..., None], axis=-1)[..., 0]
  u_BK = jax.random.uniform(key_u, (b, k))
  sampled_ok_BK = u_BK * q_x_BK < p_x_BK  # u < p/q without dividing; q(x) > 0 as x ~ q
  argmax_BK1 = jnp.argmax(target_logits_BKV, axis=-1).astype(jnp.int32)
  greedy_ok_BK = draft_BK == argmax_BK1[:, :k]
  ok_BK = jnp.where(temperature > 0, sampled_ok_BK, greedy_ok_BK)
  n_B = jnp.sum(jnp.cumprod(ok_BK.astype(jnp.int32), axis=-1), axis=-1)
  # residual norm(max(0, p - q)) at the first rejected slot; at slot k (all accepted) q is
  # zero, so the residual is p itself: the bonus token.
  q_pad_BKV = jnp.concatenate([q_BKV, jnp.zeros((b, 1, v), q_BKV.dtype)], axis=1)
  p_n_BV = jnp.take_along_axis(p_BKV, n_B[:, None, None], axis=1)[:, 0]
  q_n_BV = jnp.take_along_axis(q_pad_BKV, n_B[:, None, None], axis=1)[:, 0]
  resid_BV = jnp.maximum(p_n_BV - q_n_BV, 0.0)
  # p == q leaves no residual mass, and then a rejection has probability zero anyway
  resid_BV = jnp.where(resid_BV.sum(-1, keepdims=True) > 0, resid_BV, p_n_BV)
  drawn_B = jax.random.categorical(key_r, jnp.log(resid_BV), axis=-1).astype(jnp.int32)
  greedy_B = jnp.take_along_axis(argmax_BK1, n_B[:, None], axis=1)[:, 0]
  return n_B, jnp.where(temperature > 0, drawn_B, greedy_B)


def draft_tokens(model, buf_BS: Array, cur_B: Array, cache: dict, k: int,
                 sampling: tuple[Array, ...], key: Array, layers: list | None = None):
  """k draft steps from each row's committed length: (tokens (B, k), distributions q
  (B, k, V), cache). The first step feeds the two last committed tokens (slots cur-2, cur-1;
  slot cur-2 rewrites what it already held unless the last round accepted everything), the
  others feed the previous draft. `layers`: the draft's `decode.layer_states` when unrolled."""
  b = buf_BS.shape[0]
  start_B = jnp.maximum(cur_B - 2, 0)
  pair_B2 = jnp.take_along_axis(buf_BS, start_B[:, None] + jnp.arange(2)[None], axis=1)
  logits_BV, cache = forward_cached(model, pair_B2, start_B, cache, cur_B - 1 - start_B,
                                    layers)
  keys = jax.random.split(key, k)
  v = logits_BV.shape[-1]

  def choose(logits_BV, key):
    """(token, q): greedy skips the sort-based filtering, which only sampling needs."""
    return jax.lax.cond(sampling[0] > 0,
                        lambda: (sample_next(logits_BV, key, *sampling),
                                 filtered_probs(logits_BV, *sampling)),
                        lambda: (jnp.argmax(logits_BV, axis=-1).astype(jnp.int32),
                                 jnp.zeros((b, v), jnp.float32)))

  tok_B, q_BV = choose(logits_BV, keys[0])
  toks_BK = jnp.zeros((b, k), jnp.int32).at[:, 0].set(tok_B)
  q_BKV = jnp.zeros((b, k, v), jnp.float32).at[:, 0].set(q_BV)
  zeros_B = jnp.zeros((b,), jnp.int32)

  def step(i, carry):
    toks_BK, q_BKV, cache = carry
    prev_B = jax.lax.dynamic_index_in_dim(toks_BK, i - 1, axis=1, keepdims=False)
    logits_BV, cache = forward_cached(model, prev_B[:, None], cur_B + i - 1, cache, zeros_B,
                                      layers)
    tok_B, q_BV = choose(logits_BV, keys[i])
    toks_BK = jax.lax.dynamic_update_index_in_dim(toks_BK, tok_B, i, axis=1)
    q_BKV = jax.lax.dynamic_update_index_in_dim(q_BKV, q_BV, i, axis=1)
    return toks_BK, q_BKV, cache

  return jax.lax.fori_loop(1, k, step, (toks_BK, q_BKV, cache))


def speculative_loop(target_graphdef, target_params, draft_graphdef, draft_params,
                     tokens_BP: Array, lengths_B: Array, max_new_B: Array, stop_E: Array,
                     sampling: tuple[Array, ...], key: Array, cache_len: int, k: int,
                     unroll: bool = False):
  """Prefill both models, then draft-k / verify-once rounds in a while_loop.

  Returns (tokens (B, S_max), lengths, generated, status, drafted, accepted): the first four
  as `decode.decode_loop`, then per row the draft tokens proposed and accepted while it ran.
  `unroll` as in `decode.decode_loop`, for both models.
  """
  b, p = tokens_BP.shape
  s = cache_len
  target = nnx.merge(target_graphdef, target_params)
  draft = nnx.merge(draft_graphdef, draft_params)
  check_cache_len(target.cfg, s)
  check_cache_len(draft.cfg, s)
  check_same_vocab(target.cfg.vocab_size, draft.cfg.vocab_size)
  # k spare slots: a verify chunk near the end writes past S_max; those tokens are never kept
  t_cache = init_cache(target.cfg, b, s + k, target.dtype, per_layer=unroll or None)
  d_cache = init_cache(draft.cfg, b, s + k, draft.dtype, per_layer=unroll or None)
  t_layers = layer_states(target) if unroll else None
  d_layers = layer_states(draft) if unroll else None
  zeros_B = jnp.zeros((b,), jnp.int32)
  _, t_cache = forward_cached(target, tokens_BP, zeros_B, t_cache, zeros_B, t_layers)
  _, d_cache = forward_cached(draft, tokens_BP, zeros_B, d_cache, zeros_B, d_layers)
  buf_BS = jnp.pad(tokens_BP, ((0, 0), (0, s - p)))
  done_B, status_B = initial_status(lengths_B, max_new_B, s)

  def cond(carry):
    return jnp.any(~carry[3])

  def body(carry):
    buf, cur, n_gen, done, status, t_cache, d_cache, drafted, accepted, key = carry
    key, k_draft, k_accept = jax.random.split(key, 3)
    draft_BK, q_BKV, d_cache = draft_tokens(draft, buf, cur, d_cache, k, sampling, k_draft,
                                            d_layers)
    last_B = jnp.take_along_axis(buf, jnp.maximum(cur - 1, 0)[:, None], axis=1)
    chunk_BK1 = jnp.concatenate([last_B, draft_BK], axis=1)
    logits_BKV, t_cache = forward_cached_all(target, chunk_BK1, cur - 1, t_cache, t_layers)
    p_BKV = jax.lax.cond(sampling[0] > 0, lambda: filtered_probs(logits_BKV, *sampling),
                         lambda: jnp.zeros(logits_BKV.shape, jnp.float32))  # greedy: unused
    n_B, next_B = accept_drafts(p_BKV, q_BKV, draft_BK, logits_BKV, k_accept, sampling[0])
    active_B = ~done
    drafted = drafted + k * active_B
    accepted = accepted + n_B * active_B
    for j in range(k + 1):  # commit accepted drafts then the next token, stopping as usual
      tok_B = draft_BK[:, j] if j < k else next_B
      tok_B = jnp.where(j < n_B, tok_B, next_B)
      skip_B = j > n_B
      buf, cur, n_gen, done_j, status = step_tokens(buf, cur, n_gen, done | skip_B, status,
                                                     tok_B, max_new_B, stop_E, s)
      done = jnp.where(skip_B, done, done_j)
    return buf, cur, n_gen, done, status, t_cache, d_cache, drafted, accepted, key

  carry = (buf_BS, lengths_B, zeros_B, done_B, status_B, t_cache, d_cache, zeros_B, zeros_B,
           key)
  out = jax.lax.while_loop(cond, body, carry)
  buf_BS, cur_B, n_gen_B, _, status_B, _, _, drafted_B, accepted_B, _ = out
  return buf_BS, cur_B, n_gen_B, status_B, drafted_B, accepted_B


@dataclasses.dataclass
class SpeculativeGeneration(Generation):
  """A `Generation` plus how many draft tokens were proposed and accepted (all rows)."""

  drafted: int = 0
  accepted: int = 0

  @property
  def acceptance_rate(self) -> float:
    return self.accepted / self.drafted if self.drafted else float("nan")


def check_same_vocab(target_vocab: int, draft_vocab: int) -> None:
  """A draft scores token ids of its own vocabulary: it must be the target's."""
  if target_vocab != draft_vocab:
    raise ValueError(f"draft model vocab_size={draft_vocab} differs from the target's "
                     f"{target_vocab}; the draft must share the target's tokenizer")


class SpeculativeDecoder:
  """Target + draft compiled generate: one compilation per (batch, prompt-length) bucket.

  `draft_tokens` (k) is a shape, fixed per decoder; sampling settings are traced.
  """

  def __init__(self, target_graphdef, draft_graphdef, cache_len: int, draft_tokens: int = 4,
               unroll_layers: bool | None = None):
    if draft_tokens < 1:
      raise ValueError(f"draft_tokens={draft_tokens} must be >= 1")
    self.cache_len, self.k = int(cache_len), int(draft_tokens)
    unroll = unroll_default() if unroll_layers is None else unroll_layers
    self._traces = 0

    def run(t_params, d_params, tokens, lengths, max_new, stop, sampling, key):
      self._traces += 1  # runs only while tracing, i.e. once per compiled shape bucket
      return speculative_loop(target_graphdef, t_params, draft_graphdef, d_params, tokens,
                              lengths, max_new, stop, sampling, key, self.cache_len, self.k,
                              unroll)

    self._fn = jax.jit(run)

  def compiled_count(self) -> int:
    """How many shape buckets have been traced (and so compiled) so far."""
    return self._traces

  def generate(self, target_params, draft_params, prompts: Sequence[Sequence[int]],
               max_new_tokens: int, *, sampling: Sampling = Sampling(),
               stop_tokens: Sequence[int] = (), seed: int = 0) -> SpeculativeGeneration:
    """Like `Decoder.generate`, with the draft's params as well."""
    check_same_vocab(embedding_shape(target_params["embed"])[0],
                     embedding_shape(draft_params["embed"])[0])
    tokens, lengths, max_new, stop = pack_prompts(prompts, max_new_tokens, stop_tokens,
                                                  self.cache_len)
    out = self._fn(target_params, draft_params, tokens, lengths, max_new, stop,
                   sampling.arrays(), jax.random.PRNGKey(seed))
    buf, cur, n_gen, status, drafted, accepted = jax.device_get(out)
    gen = unpack(prompts, buf, cur, n_gen, status)
    return SpeculativeGeneration(gen.tokens, gen.status, int(np.sum(drafted)),
                                 int(np.sum(accepted)))

