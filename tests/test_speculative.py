"""Speculative decoding: greedy output equals plain decoding, sampling keeps the target's
distribution, rollback leaves caches as a fresh forward would, a foreign vocab is refused."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from helpers import tiny_gpt_workdir
from lmos_jax import cli
from lmos_jax.compress.quantize import quantize_params
from lmos_jax.compress.trim import drop_layers
from lmos_jax.errors import UserError
from lmos_jax.models.decode import (Decoder, Sampling, forward_cached, forward_cached_all,
                                    init_cache)
from lmos_jax.models.gpt import GPT
from lmos_jax.models.layers import TransformerConfig
from lmos_jax.models.speculative import (SpeculativeDecoder, accept_drafts, draft_tokens,
                                         filtered_probs)

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13]]


def gpt(seed: int, vocab: int = 40, layers: int = 2, scan: bool = True, d: int = 32,
        seq: int = 24):
  # A large init_std makes a random model's greedy continuations vary (not one repeated id).
  cfg = TransformerConfig(vocab_size=vocab, num_layers=layers, num_heads=4, num_kv_heads=2,
                          d_model=d, d_ff=2 * d, max_seq_len=seq, scan_layers=scan,
                          init_std=0.4)
  graphdef, state = nnx.split(GPT(cfg, rngs=nnx.Rngs(seed)))
  return graphdef, state.to_pure_dict()


def int8(graphdef, params):
  return graphdef, quantize_params(graphdef, params, 8, tied_embedding=True)


@pytest.fixture(scope="module")
def target():
  graphdef, params = gpt(3, layers=3)
  # 20 new tokens run into the end of the 24-slot cache (= the learned positions), where a
  # verify chunk writes past the position table
  return graphdef, params, Decoder(graphdef, 24).generate(params, PROMPTS, 20)


@pytest.mark.parametrize("k,drafts,unroll", [(1, ("other", "self"), None),
                                             (3, ("other", "trimmed"), False),
                                             (3, ("other", "trimmed", "int8 trimmed"), True),
                                             (4, ("other", "self"), None)])
def test_greedy_equals_plain_decoding(k, drafts, unroll, target):
  graphdef, params, plain = target
  refs = [t.tolist() for t in plain.tokens]
  assert plain.status == ["max_new_tokens", "cache_full", "max_new_tokens", "max_new_tokens"]
  assert len({tuple(r) for r in refs}) > 1 and any(len(set(r)) > 3 for r in refs)
  models = {"other": lambda: gpt(5, layers=1),  # another random model: disagrees mostly
            "self": lambda: (graphdef, params),
            "trimmed": lambda: drop_layers(graphdef, params, [1, 2]),
            # what `lmos compress --method int8` makes of it: QArray kernels and head, which
            # on CPU the C++ kernel multiplies (a draft's few rows)
            "int8 trimmed": lambda: int8(*drop_layers(graphdef, params, [1, 2]))}
  for name in drafts:
    dgd, dparams = models[name]()
    spec = SpeculativeDecoder(graphdef, dgd, 24, k, unroll_layers=unroll)
    out = spec.generate(params, dparams, PROMPTS, 20)
    assert [t.tolist() for t in out.tokens] == refs, name
    assert out.status == plain.status
    if name == "self":
      assert out.acceptance_rate == 1.0  # a draft equal to the target is always right
    if name == "other":
      assert out.acceptance_rate < 0.5  # the test exercises rejections, not only acceptances


def test_stops_and_full_cache_match_plain_decoding(target):
  graphdef, params, _ = target
  draft_gd, draft_params = gpt(5, layers=1)
  plain_dec = Decoder(graphdef, 16)
  spec = SpeculativeDecoder(graphdef, draft_gd, 16, 3)
  full = plain_dec.generate(params, PROMPTS, 30)
  got = spec.generate(params, draft_params, PROMPTS, 30)
  assert full.status == ["cache_full"] * 4 and got.status == full.status
  assert [t.tolist() for t in got.tokens] == [t.tolist() for t in full.tokens]
  stop = int(full.tokens[0][4])
  a = plain_dec.generate(params, PROMPTS, 9, stop_tokens=[stop])
  b = spec.generate(params, draft_params, PROMPTS, 9, stop_tokens=[stop])
  assert a.status[0] == "stop_token" and b.status == a.status
  assert [t.tolist() for t in b.tokens] == [t.tolist() for t in a.tokens]
  assert spec.compiled_count() == 1  # one (batch, prompt) bucket; budgets/stops are traced


def exact_joint(graphdef, params, prompt, n, sampling: Sampling) -> np.ndarray:
  """The target's exact distribution over its next n tokens (V**n outcomes), enumerated with
  full forwards (no cache) and the filtered, tempered softmax the sampler draws from."""
  model = nnx.merge(graphdef, params)
  v = model.cfg.vocab_size
  seqs = np.array([list(prompt) + list(c) for c in itertools.product(range(v), repeat=n)])
  logits = np.asarray(jax.jit(lambda x: model(x))(jnp.asarray(seqs, jnp.int32)))
  joint = np.ones(len(seqs))
  for i in range(n):
    pos = len(prompt) - 1 + i
    probs = np.asarray(filtered_probs(jnp.asarray(logits[:, pos]), *sampling.arrays()))
    joint *= probs[np.arange(len(seqs)), seqs[:, pos + 1]]
  return joint


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
  """Pearson chi-square goodness of fit; outcomes expected < 5 times are pooled in one bin."""
  expected = probs * counts.sum()
  small = expected < 5
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  keep = exp > 0
  return float(stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue)


@pytest.mark.parametrize("k,sampling", [(1, Sampling(temperature=1.0)),
                                        (3, Sampling(temperature=0.8, top_k=5))])
def test_sampling_keeps_target_distribution(k, sampling):
  """8-token vocab, first 2 tokens (64 outcomes) over 8192 independent draws (batch rows of
  one prompt, one compiled call). Pass: chi-square p-value > 1e-3 against the target's exact
  joint and total variation < 0.06 (sampling noise alone is ~0.03 here); the same bounds
  against the draft's own joint must fail, so the test can tell the two apart."""
  tgd, tparams = gpt(1, vocab=8, layers=2, d=16, seq=8)
  dgd, dparams = gpt(2, vocab=8, layers=1, d=16, seq=8)
  prompt, n, rows = [3, 1], 2, 8192
  out = SpeculativeDecoder(tgd, dgd, 8, k).generate(tparams, dparams, [prompt] * rows, n,
                                                    sampling=sampling, seed=7)
  assert 0 < out.accepted < out.drafted  # both the accept and the residual path ran
  idx = np.array([t[0] * 8 + t[1] for t in out.tokens])
  counts = np.bincount(idx, minlength=64).astype(float)
  p = exact_joint(tgd, tparams, prompt, n, sampling)
  q = exact_joint(dgd, dparams, prompt, n, sampling)
  assert abs(p.sum() - 1) < 1e-5
  tv = 0.5 * np.abs(counts / rows - p).sum()
  assert chi2_pvalue(counts, p) > 1e-3 and tv < 0.06, (chi2_pvalue(counts, p), tv)
  assert 0.5 * np.abs(p - q).sum() > 0.2  # the draft is far from the target ...
  assert chi2_pvalue(counts, q) < 1e-3  # ... and the draws are told apart from it


def test_rollback_keeps_next_logits_equal_fresh_forward():
  """Three draft/verify rounds by hand with a disagreeing draft; after each, the logits at the
  last accepted token from the rolled-back caches (target and draft) equal a full forward
  over the accepted prefix, atol 1e-4."""
  tgd, tparams = gpt(3, layers=3)
  dgd, dparams = gpt(5, layers=1)
  k, s = 3, 24
  greedy = Sampling().arrays()
  zero = jnp.zeros((1,), jnp.int32)
  cfg = {"t": nnx.merge(tgd, tparams).cfg, "d": nnx.merge(dgd, dparams).cfg}
  gds = {"t": tgd, "d": dgd}

  @jax.jit
  def prefill(tp, dp, ids):
    caches = {}
    for name, p in (("t", tp), ("d", dp)):
      cache = init_cache(cfg[name], 1, s + k, jnp.float32)
      _, caches[name] = forward_cached(nnx.merge(gds[name], p), ids, zero, cache, zero)
    return caches

  @jax.jit
  def one_round(tp, dp, buf, cur, caches, key):
    drafts, q, d_cache = draft_tokens(nnx.merge(dgd, dp), buf, cur, caches["d"], k, greedy,
                                      key)
    last = jnp.take_along_axis(buf, cur[:, None] - 1, axis=1)
    chunk = jnp.concatenate([last, drafts], axis=1)
    logits, t_cache = forward_cached_all(nnx.merge(tgd, tp), chunk, cur - 1, caches["t"])
    n, nxt = accept_drafts(filtered_probs(logits, *greedy), q, drafts, logits, key, greedy[0])
    return drafts, n, nxt, {"t": t_cache, "d": d_cache}

  @jax.jit
  def cached_vs_fresh(tp, dp, buf, cur, caches):
    """Next-step logits from the caches (the draft refeeds its two last tokens, as it is one
    slot behind after an all-accepted round) and from full forwards over buf (zero padded;
    causal, so the padding cannot change earlier positions)."""
    start = cur - 2
    pair = jnp.take_along_axis(buf, start[:, None] + jnp.arange(2)[None], axis=1)
    last = pair[:, 1:]
    t_got, _ = forward_cached(nnx.merge(tgd, tp), last, cur - 1, caches["t"], zero)
    d_got, _ = forward_cached(nnx.merge(dgd, dp), pair, start, caches["d"], zero + 1)
    fresh = [jnp.take_along_axis(nnx.merge(g, p)(buf), cur[:, None, None] - 1, axis=1)[:, 0]
             for g, p in ((tgd, tparams), (dgd, dparams))]
    return t_got, d_got, fresh[0], fresh[1]

  seq = [4, 5, 6, 7]
  caches = prefill(tparams, dparams, jnp.asarray([seq], jnp.int32))
  accepted_counts = []
  for r in range(3):
    buf = jnp.asarray([seq + [0] * (s - len(seq))], jnp.int32)
    cur = jnp.asarray([len(seq)], jnp.int32)
    drafts, n, nxt, caches = one_round(tparams, dparams, buf, cur, caches,
                                       jax.random.PRNGKey(r))
    n = int(n[0])
    accepted_counts.append(n)
    seq += np.asarray(drafts[0, :n]).tolist() + [int(nxt[0])]
    buf = jnp.asarray([seq + [0] * (s - len(seq))], jnp.int32)
    t_got, d_got, t_fresh, d_fresh = cached_vs_fresh(tparams, dparams, buf,
                                                     jnp.asarray([len(seq)], jnp.int32),
                                                     caches)
    np.testing.assert_allclose(np.asarray(t_got), np.asarray(t_fresh), atol=1e-4)
    np.testing.assert_allclose(np.asarray(d_got), np.asarray(d_fresh), atol=1e-4)
  assert any(n < k for n in accepted_counts)  # a rollback (rejection) happened


CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"


def test_cli_draft_matches_plain_greedy(tmp_path, capsys):
  target = tiny_gpt_workdir(tmp_path / "target", CHARS, 3)
  draft = tiny_gpt_workdir(tmp_path / "draft", CHARS, 3, drop=[1, 2])
  base = ["generate", f"--workdir={target}", "--prompt=the ", "--prompt=a",
          "--max-new-tokens=12", "--temperature=0"]
  assert cli.main(base) == 0
  plain = capsys.readouterr()
  assert cli.main(base + [f"--draft-workdir={draft}", "--draft-tokens=3"]) == 0
  spec = capsys.readouterr()
  assert spec.out == plain.out and "--- [12 tokens, max_new_tokens]" in plain.out
  assert "generated 24 tokens in " in plain.err and "tok/s" in plain.err
  assert "generated 24 tokens in " in spec.err and "draft acceptance " in spec.err
  with pytest.raises(UserError, match="already holds"):  # a run is never overwritten
    tiny_gpt_workdir(tmp_path / "draft", CHARS, 3, drop=[1, 2])


def test_other_vocab_is_refused(tmp_path, capsys):
  tgd, tparams = gpt(3)
  dgd, dparams = gpt(5, vocab=41)
  with pytest.raises(ValueError, match="vocab_size=41 differs from the target's 40"):
    SpeculativeDecoder(tgd, dgd, 24, 2).generate(tparams, dparams, [[1]], 3)
  target = tiny_gpt_workdir(tmp_path / "target", CHARS, 2)
  for name, chars in (("bigger", CHARS + "!"), ("other", CHARS.replace("z", "!"))):
    draft = tiny_gpt_workdir(tmp_path / name, chars, 1)
    code = cli.main(["generate", f"--workdir={target}", f"--draft-workdir={draft}",
                     "--prompt=ab", "--max-new-tokens=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "--draft-workdir" in err[0] and "tokenizer" in err[0], err
    assert ("31 tokens" in err[0]) == (name == "bigger"), err
