"""KV-cache decoding: equals full recompute (scanned or unrolled layers), sampling supports,
stops, cache-full, buckets, mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmos_jax.models.decode import Decoder, Sampling, filter_logits, sample_next
from lmos_jax.models.gpt import GPT
from lmos_jax.models.layers import TransformerConfig
from lmos_jax.parallel.sharding import make_mesh, state_shardings

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13]]


def tiny(scan: bool, pos_emb: str = "learned", kv: int = 2) -> tuple[GPT, object, dict]:
  # A large init_std makes a random model's greedy continuations vary (not one repeated id).
  cfg = TransformerConfig(vocab_size=40, num_layers=2, num_heads=4, num_kv_heads=kv,
                          d_model=32, d_ff=64, max_seq_len=24, scan_layers=scan,
                          pos_emb=pos_emb, init_std=0.4)
  model = GPT(cfg, rngs=nnx.Rngs(3))
  graphdef, state = nnx.split(model)
  return model, graphdef, state.to_pure_dict()


def reference_greedy(model, prompts, n):
  """Independent reference: the plain model over the whole prefix (zero-padded to the
  model's length; causal, so the padding cannot change earlier logits), every step."""
  graphdef, state = nnx.split(model)
  width = model.cfg.max_seq_len
  logits_fn = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids[None])[0])
  outs = []
  for prompt in prompts:
    ids = list(prompt)
    for _ in range(n):
      window = np.zeros((width,), np.int32)
      window[:len(ids)] = ids
      ids.append(int(jnp.argmax(logits_fn(state, window)[len(ids) - 1])))
    outs.append(ids[len(prompt):])
  return outs


@pytest.fixture(scope="module")
def scan_refs():
  model, graphdef, params = tiny(True)
  return graphdef, params, reference_greedy(model, PROMPTS, 8)


# A stacked model decodes scanned (one stacked cache) or unrolled (a layer slice and a cache
# per layer); an unrolled model always runs its own layers.
@pytest.mark.parametrize("scan,pos_emb,kv,unroll", [(True, "learned", 2, False),
                                                    (True, "learned", 2, True),
                                                    (False, "rope", 4, None)])
def test_greedy_cache_equals_full_recompute(scan, pos_emb, kv, unroll, scan_refs):
  model, graphdef, params = tiny(scan, pos_emb, kv)
  out = Decoder(graphdef, 24, unroll_layers=unroll).generate(params, PROMPTS, 8)
  refs = scan_refs[2] if scan else reference_greedy(model, PROMPTS, 8)
  assert [t.tolist() for t in out.tokens] == refs
  assert len({tuple(r) for r in refs}) > 1 and any(len(set(r)) > 2 for r in refs)
  assert out.status == ["max_new_tokens"] * len(PROMPTS)
  if unroll:  # the compiled no-cache loop (the benchmark's baseline) agrees as well
    no_cache = Decoder(graphdef, 24, use_cache=False).generate(params, PROMPTS, 8)
    assert [t.tolist() for t in no_cache.tokens] == refs


def _np_support(logits, k, p, min_p):
  """Numpy reference of the kept set: top-k, then nucleus, then min-p."""
  order = np.argsort(-logits)
  keep = np.zeros_like(logits, bool)
  keep[order[:k] if k > 0 else order] = True
  x = np.where(keep, logits, -np.inf)
  probs = np.exp(x - x.max())
  probs /= probs.sum()
  order = np.argsort(-probs)
  nucleus, mass = [], 0.0
  for i in order:
    if mass >= p:
      break
    nucleus.append(i)
    mass += probs[i]
  keep2 = np.zeros_like(keep)
  keep2[nucleus] = True
  return keep & keep2 & (probs >= min_p * probs.max())


@pytest.mark.parametrize("k,p,min_p", [(5, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.3),
                                       (8, 0.9, 0.05)])
def test_filter_supports_match_reference(k, p, min_p):
  logits = np.asarray(jax.random.normal(jax.random.PRNGKey(k), (3, 30))) * 2.0
  got = np.isfinite(np.asarray(jax.jit(filter_logits)(jnp.asarray(logits), jnp.int32(k),
                                                      jnp.float32(p), jnp.float32(min_p))))
  want = np.stack([_np_support(row, k, p, min_p) for row in logits])
  np.testing.assert_array_equal(got, want)
  # draws never leave the support
  keys = jax.random.split(jax.random.PRNGKey(1), 200)
  draws = jax.jit(jax.vmap(lambda key: sample_next(jnp.asarray(logits), key, jnp.float32(1.0),
                                           jnp.int32(k), jnp.float32(p),
                                           jnp.float32(min_p))))(keys)
  for row in range(3):
    assert set(np.asarray(draws[:, row]).tolist()) <= set(np.flatnonzero(want[row]).tolist())


def test_stop_tokens_cache_full_and_one_compile_per_bucket():
  model, graphdef, params = tiny(True)
  dec = Decoder(graphdef, 16)
  full = dec.generate(params, PROMPTS[:2], 30)
  # 30 new tokens do not fit in a 16-slot cache: each row says so, with exactly what fit
  assert full.status == ["cache_full", "cache_full"]
  assert [len(t) for t in full.tokens] == [16 - 3, 16 - 7]
  stop = int(full.tokens[0][2])
  first = next(i for i, t in enumerate(full.tokens[0].tolist()) if t == stop)
  stopped = dec.generate(params, PROMPTS[:2], 5, stop_tokens=[stop],
                         sampling=Sampling(temperature=0.0, top_k=3))
  assert stopped.status[0] == "stop_token"
  assert stopped.tokens[0].tolist() == full.tokens[0][:first + 1].tolist()
  # other prompts of the same bucket, other sampling settings: no new compilation
  dec.generate(params, [[5, 6], [7]], 4, sampling=Sampling(0.8, 5, 0.9, 0.1), seed=3)
  assert dec.compiled_count() == 1
  with pytest.raises(ValueError, match="cache holds 16"):
    dec.generate(params, [list(range(17))], 2)
  with pytest.raises(ValueError, match="cache_len=32 exceeds"):
    Decoder(graphdef, 32).generate(params, [[1]], 1)


def test_sharded_mesh_matches_full_recompute(scan_refs):
  graphdef, params, refs = scan_refs
  mesh = make_mesh((2, 2, 2))
  abstract = nnx.split(nnx.eval_shape(lambda: GPT(tiny_cfg_like(graphdef, params),
                                                  rngs=nnx.Rngs(0))))[1]
  shardings = state_shardings(abstract, mesh).to_pure_dict()
  placed = jax.device_put(params, shardings)
  assert placed["blocks"]["mlp"]["up"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
  got = Decoder(graphdef, 24, mesh=mesh).generate(placed, PROMPTS, 8)
  assert [t.tolist() for t in got.tokens] == refs


def tiny_cfg_like(graphdef, params) -> TransformerConfig:
  return nnx.merge(graphdef, params).cfg
