"""BERT encoder, MLM loss and masking, init_from in the trainer (no torch needed here)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import assert_trees_equal
from lmos_jax.data.encoder import MLMData, mlm_mask
from lmos_jax.convert import to_hf_from_workdir
from lmos_jax.workdir import write_tokenizer
from lmos_jax.models import hf
from lmos_jax.models.bert import BERT
from lmos_jax.models.layers import TransformerConfig
from lmos_jax.train.losses import mlm_loss


def bert_tcfg(**kw) -> TransformerConfig:
  base = dict(vocab_size=53, num_layers=2, num_heads=4, d_model=32, d_ff=48, max_seq_len=16,
              norm_eps=1e-12, norm_position="post", mlp="gelu_exact",
              type_vocab_size=2, init_std=0.2)
  base.update(kw)
  return TransformerConfig(**base)


def make_bert(tcfg: TransformerConfig, head: str | None = None, seed: int = 0) -> BERT:
  """A BERT with random N(0, 0.2) weights drawn on the host: an eager nnx init would
  compile one XLA program per parameter shape, which dominates these tests' time."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: BERT(tcfg, head=head, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  nnx.replace_by_pure_dict(state, jax.tree.map(
      lambda a: jnp.asarray(rng.normal(0, 0.2, a.shape), jnp.float32), nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, input_ids, inputs):
  return nnx.merge(graphdef, state)(input_ids, **inputs)


def run(model: BERT, input_ids, **inputs) -> jax.Array:
  """model(input_ids, **inputs) compiled as one program (eager dispatch compiles every op
  separately)."""
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, input_ids, inputs)


@pytest.fixture(scope="module")
def mlm_model():
  return make_bert(bert_tcfg())


def test_output_shapes_per_head():
  ids = jnp.ones((2, 7), jnp.int32)
  assert run(make_bert(bert_tcfg()), ids).shape == (2, 7, 53)
  assert run(make_bert(bert_tcfg(num_labels=3)), ids).shape == (2, 3)
  assert run(make_bert(bert_tcfg(), head="none"), ids).shape == (2, 7, 32)
  with pytest.raises(ValueError, match="num_labels"):
    BERT(bert_tcfg(), head="cls", rngs=nnx.Rngs(0))


def test_padding_does_not_change_real_tokens(mlm_model):
  """Padding keys are masked out: real positions equal the unpadded sequence's output."""
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 53, (1, 6))
  short = run(mlm_model, jnp.asarray(ids))
  padded_ids = np.concatenate([ids, np.zeros((1, 4), np.int64)], axis=1)
  mask = np.concatenate([np.ones((1, 6)), np.zeros((1, 4))], axis=1)
  padded = run(mlm_model, jnp.asarray(padded_ids), attention_mask=jnp.asarray(mask))
  # f32: 6 keys, or 10 with 4 masked to exactly-zero weight: same sums, other blocking and
  # order; logits are O(1) (ulp 1.2e-7), so 1e-5 is ~80 ulp and 100x below the mask's effect
  np.testing.assert_allclose(padded[:, :6], short, atol=1e-5)
  unmasked = run(mlm_model, jnp.asarray(padded_ids))
  assert np.abs(np.asarray(unmasked[:, :6] - short)).max() > 1e-3  # the mask matters


def test_token_types_change_outputs(mlm_model):
  ids = jnp.arange(8)[None] % 53
  a = run(mlm_model, ids, token_type_ids=jnp.zeros((1, 8), jnp.int32))
  b = run(mlm_model, ids, token_type_ids=jnp.asarray([[0, 0, 0, 0, 1, 1, 1, 1]]))
  assert np.abs(np.asarray(a - b)).max() > 1e-3  # a real change, 1e4x f32 noise on O(1)
  # None means all type 0: the same row-0 lookup and sums, expected bit-equal; 1e-6 leaves a
  # few ulp of the O(1) logits should XLA fuse the constant ids differently
  np.testing.assert_allclose(run(mlm_model, ids), a, atol=1e-6)


def test_scan_and_unrolled_layers_agree():
  """Same weights stacked (scan) or as a list give the same logits."""
  scanned = make_bert(bert_tcfg(scan_layers=True), seed=1)
  p = nnx.to_pure_dict(nnx.split(scanned)[1])
  unrolled = nnx.eval_shape(lambda: BERT(bert_tcfg(scan_layers=False), rngs=nnx.Rngs(0)))
  g, state = nnx.split(unrolled)
  q = dict(p)
  q["blocks"] = {i: jax.tree.map(lambda x: x[i], p["blocks"]) for i in range(2)}
  nnx.replace_by_pure_dict(state, q)
  ids = jnp.asarray([[3, 5, 7, 9, 11]])
  # f32, the same ops in a loop over stacked layers or unrolled: XLA may fuse and order the
  # reductions differently; O(1) logits, so 1e-5 is ~80 ulp
  np.testing.assert_allclose(run(nnx.merge(g, state), ids), run(scanned, ids), atol=1e-5)


def test_mlm_loss_matches_numpy_reference(mlm_model):
  rng = np.random.default_rng(1)
  batch = {"inputs": jnp.asarray(rng.integers(0, 53, (3, 9)), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, 53, (3, 9)), jnp.int32),
           "weights": jnp.asarray(rng.random((3, 9)) < 0.3, jnp.float32),
           "attention_mask": jnp.ones((3, 9), jnp.int32)}
  graphdef, state = nnx.split(mlm_model)
  loss_sum, weight, aux = jax.jit(lambda s, b: mlm_loss(nnx.merge(graphdef, s), b, None))(
      state, batch)
  logits = np.asarray(run(mlm_model, batch["inputs"]), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  tgt = np.asarray(batch["targets"])
  nll = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
  w = np.asarray(batch["weights"])
  # the loss's own compiled forward (logits ~1e-7 relative from `run`'s) against a float64
  # reference over ~8 picked tokens: a few eps; rtol 1e-5 ~ 80 eps
  np.testing.assert_allclose(float(loss_sum), (nll * w).sum(), rtol=1e-5)
  assert float(weight) == w.sum()
  assert float(aux["correct"]) == ((logits.argmax(-1) == tgt) * w).sum()


def test_mlm_mask_proportions_and_specials():
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 1000, (64, 512))
  ids[:, 0] = 1  # a special id (like [CLS]) is never picked
  out = mlm_mask(ids, np.random.default_rng(3), mask_id=2, vocab_size=1000, prob=0.15,
                 special_ids=(1, 2))
  picked = out["weights"] > 0
  assert not picked[:, 0].any()
  # seeded draws, so deterministic; the bounds are in sigmas of the sampling noise: the mean
  # of 32704 Bernoulli(0.15) has sigma 0.002 (0.005 = 2.5 sigma)
  assert abs(picked.mean() - 0.15 * 511 / 512) < 0.005
  masked = (out["inputs"] == 2) & picked
  kept = (out["inputs"] == ids) & picked
  # of ~4900 picked: sigma 0.006 for the 80% share (0.02 = 3.5 sigma), 0.004 for the 10%
  assert abs(masked.sum() / picked.sum() - 0.8) < 0.02
  assert abs(kept.sum() / picked.sum() - 0.1) < 0.02  # (random draws rarely hit the same id)
  assert np.array_equal(out["targets"], ids)
  assert np.array_equal(out["inputs"][~picked], ids[~picked])
  again = mlm_mask(ids, np.random.default_rng(3), mask_id=2, vocab_size=1000, special_ids=(1, 2))
  assert np.array_equal(again["inputs"], out["inputs"])


class _Windows:
  """A minimal LM data object: fixed windows of a byte-like vocabulary."""

  class tokenizer:  # noqa: N801 - mimics a tokenizer instance
    vocab_size = 256
    specials = {}

  def train_batch(self, step):
    ids = np.random.default_rng(step).integers(0, 256, (4, 32)).astype(np.int32)
    return {"inputs": ids, "targets": ids, "weights": np.ones_like(ids, np.float32)}

  def val_batches(self):
    return [self.train_batch(100)]


def test_mlm_data_adds_mask_id_and_is_a_function_of_step():
  data = MLMData(_Windows(), 0.15, seed=0)
  assert data.mask_id == 256 and data.tokenizer.vocab_size == 257
  a, b = data.train_batch(5), data.train_batch(5)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(a["inputs"], data.train_batch(6)["inputs"])
  assert (a["inputs"] == 256).any() and a["inputs"].max() <= 256


VOCAB = 512  # configs/bert_mlm.py:tiny's BPE size


def _tiny_mlm_config(init_from: str = ""):
  import importlib.util
  spec = importlib.util.spec_from_file_location("bert_mlm_cfg", "configs/bert_mlm.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("tiny")
  c.data.max_chars, c.train.batch_size, c.train.steps = 20_000, 8, 6
  c.model.vocab_size = VOCAB  # fixed: the HF checkpoint is written before the BPE is trained
  c.model.init_from = init_from
  return c


def _random_params(abstract: dict) -> dict:
  """Host random values for every param (no per-shape compiles; see make_bert)."""
  rng = np.random.default_rng(7)
  return jax.tree.map(lambda a: rng.normal(0, 0.05, a.shape).astype(np.float32), abstract)


def test_trainer_init_from_hf_and_mlm_steps(tmp_path):
  """A HF-layout BERT MLM checkpoint starts the run; MLM steps on one batch lower the loss."""
  from lmos_jax.train.checkpoint import Checkpointer
  from lmos_jax.train.step import train_step
  from lmos_jax.train.trainer import build_run, global_batch, init_or_restore

  cfg = _tiny_mlm_config()
  t = hf.spec_from_lmos_config(cfg.model, VOCAB)
  params = _random_params(hf.abstract_params(t))
  hf.save_hf(t, params, tmp_path / "hf")
  run = build_run(_tiny_mlm_config(str(tmp_path / "hf")))
  state, _ = init_or_restore(run, Checkpointer(tmp_path / "wd", keep=1))
  assert_trees_equal(state["params"], params)
  moments = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state["opt_state"]))]
  assert all(not m.any() for m in moments if m.ndim > 0)  # fresh Adam moments
  batch = global_batch(run, run.data.train_batch(0))
  assert set(batch) >= {"inputs", "targets", "weights"}
  step = jax.jit(lambda s, b: train_step(run.step_cfg, s, b))
  losses = []
  with jax.set_mesh(run.mesh):
    for _ in range(5):
      state, m = step(state, batch)
      losses.append(float(m["loss"]))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  # The trained workdir converts back to HF (what `lmos convert --to-hf` does), exactly.
  wd = tmp_path / "wd2"
  ckpt = Checkpointer(wd, keep=1)
  ckpt.save(5, state, {"step": 5})
  ckpt.close()
  (wd / "config.json").write_text(run.cfg.to_json())
  write_tokenizer(wd, run.data.tokenizer)  # the BPE with BERT's specials, [MASK] among them
  to_hf_from_workdir(wd, tmp_path / "back")
  _, back = hf.load_hf_params(tmp_path / "back")
  assert_trees_equal(jax.device_get(state["params"]), back)
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(tmp_path / "back")
  assert tok.mask_token_id == run.data.mask_id == run.data.tokenizer.specials["mask"]
  text = "To be, or not to be"
  assert tok(text, add_special_tokens=False)["input_ids"] == list(run.data.tokenizer.encode(text))


def test_init_from_shape_mismatch_names_tensor(tmp_path):
  from lmos_jax.models.factory import model_factory
  from lmos_jax.train.step import abstract_model_state

  t = hf.spec_from_lmos_config(_tiny_mlm_config().model, VOCAB)
  hf.save_hf(t, _random_params(hf.abstract_params(t)), tmp_path / "hf")
  cfg = _tiny_mlm_config(str(tmp_path / "hf"))
  cfg.model.d_ff = 96  # the checkpoint has the default 4 * d_model = 256
  _, abstract = abstract_model_state(model_factory(cfg.model, VOCAB))
  with pytest.raises(hf.HFConversionError, match=r"intermediate\.dense\.weight.*\(96, 64\)"):
    hf.hf_params_from_config(cfg, tmp_path / "hf", nnx.to_pure_dict(abstract))


def test_bert_shards_by_the_one_rule_table(mlm_model):
  """BERT params get their mesh placement from the shared logical names; sharded = eager."""
  from jax.sharding import PartitionSpec as P
  from lmos_jax.parallel.sharding import make_mesh, state_shardings

  mesh = make_mesh((2, 2, 2))
  graphdef, state = nnx.split(mlm_model)
  sh = nnx.to_pure_dict(state_shardings(state, mesh))
  assert sh["embed"].spec == P(None, "fsdp")  # 53 ids do not split over tensor=2
  assert sh["mlm_dense"]["kernel"].spec == P("fsdp", None)
  assert sh["blocks"]["attn"]["query"]["kernel"].spec == P(None, "fsdp", "tensor", None)
  assert sh["type_embed"].spec == P(None, "fsdp")
  params = jax.device_put(nnx.to_pure_dict(state), sh)
  ids = jnp.asarray(np.random.default_rng(2).integers(0, 53, (4, 8)), jnp.int32)
  with jax.set_mesh(mesh):
    out = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, ids)
  # f32, reductions split over the 2x2x2 mesh's shards and re-summed vs one device: O(1)
  # logits, 1e-5 is ~80 ulp
  np.testing.assert_allclose(out, run(mlm_model, ids), atol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, input_ids, inputs):
  return nnx.merge(graphdef, state).encode(input_ids, **inputs)


def test_mean_pooling_is_the_kept_tokens_mean_padded_or_packed():
  """pooling='mean' (no pooler): logits = classifier(mean of the final states of the tokens
  the attention mask keeps), against numpy on the encoder's states; extra padding does not
  move them; and the packed serving path (several texts in one row, per-text means) gives
  each text's padded-row probabilities."""
  from lmos_jax.data.packing import PackShape, pack_texts
  from lmos_jax.inference.predict import packed_heads
  model = make_bert(bert_tcfg(num_labels=3, pooling="mean"), seed=1)
  assert model.pooler is None
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1, 53, (2, 9)), jnp.int32)
  lengths = np.array([9, 5])
  mask = jnp.asarray(np.arange(9)[None, :] < lengths[:, None], jnp.int32)
  logits = np.asarray(run(model, ids, attention_mask=mask))

  graphdef, state = nnx.split(model)
  x = np.asarray(_encode(graphdef, state, ids, {"attention_mask": mask}))
  m = np.asarray(mask, np.float64)[..., None]
  mean = (x * m).sum(1) / m.sum(1)
  ref = mean @ np.asarray(model.classifier.kernel[...]) + np.asarray(model.classifier.bias[...])
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
  # the padded row equals that text alone with no padding
  np.testing.assert_allclose(np.asarray(run(model, ids[1:, :5]))[0], logits[1], atol=1e-5)

  rows = {"inputs": np.asarray(ids), "token_type_ids": np.zeros((2, 9), np.int32)}
  packed = pack_texts(rows, lengths, PackShape(rows=1, width=16), np.array([0, 0]),
                      np.array([0, 9]), num_texts=3)
  x_RWD = _encode(graphdef, state, jnp.asarray(packed["inputs"]), {
      k: jnp.asarray(packed[k]) for k in ("token_type_ids", "position_ids", "segment_ids")})
  probs, _ = packed_heads(model, x_RWD, jnp.asarray(packed["cls_index"]),
                          jnp.asarray(packed["text_index"]))
  np.testing.assert_allclose(np.asarray(probs)[:2], np.asarray(jax.nn.softmax(logits)),
                             atol=1e-5)
