"""Finetuning: TSV reading, classifier batching, cls_loss, training a BERT classifier (full
and PEFT), adapter-only checkpoints applied on the base at load, and `lmos predict`."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import assert_trees_equal
from lmos_jax.config.schema import base_config
from lmos_jax.data.encoder import (ClassificationData, classifier_rows, encode_for_classifier,
                                   label_ids, read_tsv)
from lmos_jax.data.tokenizer import load_pretrained
from lmos_jax.models.bert import BERT
from lmos_jax.models.hf import minilm_dir
from lmos_jax.models.layers import TransformerConfig
from lmos_jax.peft.methods import peft_loss, peft_optimizer, trainable_for, wrap_factory
from lmos_jax.train.losses import cls_loss
from lmos_jax.train.optim import make_optimizer
from lmos_jax.train.precision import resolve_policy
from lmos_jax.train.step import StepConfig, train_step


@pytest.fixture(scope="module")
def tok():
  return load_pretrained(minilm_dir())


def write(path, text: str) -> str:
  path.write_text(text)
  return str(path)


def test_read_tsv_any_column_order_and_quotes(tmp_path):
  a = read_tsv(write(tmp_path / "a.tsv", 'sentence\tlabel\nit \'s "great"\t1\nbad .\t0\n'))
  b = read_tsv(write(tmp_path / "b.tsv", "label\tcontent\n0\tone long string\n\n1\tfun\n"))
  assert a.text_a == ['it \'s "great"', "bad ."] and a.labels == ["1", "0"]
  assert b.text_a == ["one long string", "fun"] and b.labels == ["0", "1"]
  with pytest.raises(ValueError, match="no 'label' column"):
    read_tsv(write(tmp_path / "c.tsv", "sentence\ttarget\nx\t1\n"))
  with pytest.raises(ValueError, match=r"c2.tsv:3: 1 fields"):
    read_tsv(write(tmp_path / "c2.tsv", "sentence\tlabel\nx\t1\ny\n"))


def test_label_outside_set_is_a_clear_error():
  assert list(label_ids(["1", "0", "1"], ["0", "1"], "dev.tsv")) == [1, 0, 1]
  with pytest.raises(ValueError, match=r"dev.tsv: row 2 has label '2'.*\['0', '1'\]"):
    label_ids(["1", "2"], ["0", "1"], "dev.tsv")


def test_padding_masks_and_pairs_match_hf_tokenizer(tok):
  from tokenizers import Tokenizer
  ref = Tokenizer.from_file(f"{minilm_dir()}/tokenizer.json")  # adds [CLS]/[SEP] itself
  ref.no_padding()
  out = encode_for_classifier(tok, ["a fine film", "no"], ["really good", "meh"], 12)
  for i, (x, y) in enumerate([("a fine film", "really good"), ("no", "meh")]):
    enc = ref.encode(x, y)
    n = len(enc.ids)
    np.testing.assert_array_equal(out["inputs"][i, :n], enc.ids)
    np.testing.assert_array_equal(out["token_type_ids"][i, :n], enc.type_ids)
    assert out["attention_mask"][i].sum() == n and (out["inputs"][i, n:] == 0).all()
  long = encode_for_classifier(tok, ["word " * 40], None, 10)
  assert long["attention_mask"].sum() == 10 and long["inputs"][0, -1] == tok.specials["sep"]


def test_dev_batches_cover_every_row_once(tok, tmp_path):
  rows = [f"s{i}\t{i % 2}" for i in range(11)]
  texts = read_tsv(write(tmp_path / "d.tsv", "sentence\tlabel\n" + "\n".join(rows)))
  r = classifier_rows(tok, texts, ["0", "1"], 8)
  data = ClassificationData(tok, ["0", "1"], r, r, batch_size=4, seed=0)
  vb = data.val_batches()
  assert len(vb) == 3 and sum(float(b["weights"].sum()) for b in vb) == 11
  seen = np.concatenate([b["labels"][b["weights"] > 0] for b in vb])
  np.testing.assert_array_equal(seen, r["labels"])
  # one epoch of training batches visits every row once, in a seeded order
  idx = np.concatenate([data.rows_for_step(s) for s in range(3)])[:11]
  assert sorted(idx.tolist()) == list(range(11))


def test_cls_loss_matches_numpy_reference():
  logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [5.0, 0.0, 0.0]], np.float32)
  labels = np.array([0, 2, 1])
  weights = np.array([1.0, 1.0, 0.0], np.float32)
  model = lambda input_ids, rng=None, **inputs: jnp.asarray(logits)  # noqa: E731
  loss_sum, weight, aux = cls_loss(model, {"inputs": np.zeros((3, 4), np.int32),
                                           "labels": labels, "weights": weights}, None)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -(logp[np.arange(3), labels] * weights).sum()
  # f32 on both sides, log-softmax of 3 logits by two formulas, 2 weighted terms: a few
  # roundings (~eps = 1.2e-7 each); rtol 1e-6 ~ 8 eps
  np.testing.assert_allclose(float(loss_sum), want, rtol=1e-6)
  assert float(weight) == 2.0 and float(aux["correct"]) == 2.0  # row 2 has weight 0


def tiny_bert_cfg(**kw) -> TransformerConfig:
  base = dict(vocab_size=64, num_layers=2, num_heads=2, d_model=32, d_ff=64, max_seq_len=16,
              norm_position="post", mlp="gelu_exact", norm_eps=1e-12,
              type_vocab_size=2, num_labels=2)
  base.update(kw)
  return TransformerConfig(**base)


def synthetic_batch(step: int, b: int = 32, t: int = 12) -> dict:
  """Label = which of two marker tokens sits at position 1 (the rest is noise): the
  classifier must carry it from position 1 to the [CLS] position through attention."""
  rng = np.random.default_rng(step)
  x = rng.integers(10, 60, (b, t))
  y = rng.integers(0, 2, b)
  x[:, 0], x[:, 1] = 2, np.where(y == 1, 4, 3)
  return {"inputs": x.astype(np.int32), "labels": y.astype(np.int32),
          "attention_mask": np.ones((b, t), np.int32)}


def tiny_cls_training(p, t):
  """(jitted train step, initial state, trainable predicate) for the tiny BERT classifier
  wrapped by the PEFT config `p` and optimised by the train config `t`."""
  make = wrap_factory(lambda rngs: BERT(tiny_bert_cfg(), rngs=rngs), p)
  graphdef, state = nnx.split(make(nnx.Rngs(params=0)))
  params = nnx.to_pure_dict(state)
  trainable = trainable_for(p)
  tx = peft_optimizer(make_optimizer(t, trainable), p, t.steps)
  cfg = StepConfig(graphdef=graphdef, tx=tx, loss_fn=peft_loss(cls_loss, p),
                   policy=resolve_policy("fp32"), trainable=trainable)
  st = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
        "rng": jax.random.PRNGKey(0)}
  return jax.jit(lambda s, b: train_step(cfg, s, b)), st, trainable


@pytest.mark.parametrize("method", ["lora"])  # the harder case: a frozen random encoder
def test_classification_loss_falls(method):
  p = base_config().peft
  p.method, p.trainable_extra, p.rank = method, "classifier", 8
  t = base_config().train
  t.lr, t.warmup_steps, t.schedule, t.steps, t.weight_decay = 3e-3, 0, "constant", 30, 0.0
  if method == "lora":
    p.target_modules, t.lr = "attn/(query|key|value|out)$|mlp/(up|down)$", 1e-2
  step, st, _ = tiny_cls_training(p, t)
  losses = []
  for i in range(t.steps):
    st, m = step(st, synthetic_batch(i))
    losses.append(float(m["loss"]))
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert first > 0.6 and last < 0.45, (first, last)  # chance level is ln 2 = 0.69


def test_train_lora_adapter_checkpoint_and_predict(tiny_hf_dir, tmp_path, capsys):
  """`lmos train` (task cls, LoRA) -> adapters.safetensors -> base + adapters == trained."""
  import importlib.util
  from lmos_jax.inference import predict as pred
  from lmos_jax.models.factory import model_factory
  from lmos_jax.models.hf import apply_hf_model_config
  from lmos_jax.peft.wrap import load_adapters
  from lmos_jax.train.trainer import train

  spec = importlib.util.spec_from_file_location("bert_sst2", "configs/bert_sst2.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("lora")
  apply_hf_model_config(tiny_hf_dir, c.model)
  c.data.tokenizer_path = tiny_hf_dir
  good, bad = ["a great , moving film", "wonderful acting"], ["dull and bad", "awful mess"]
  lines = [f"{s}\t1" for s in good] * 4 + [f"{s}\t0" for s in bad] * 4
  c.data.train = write(tmp_path / "train.tsv", "sentence\tlabel\n" + "\n".join(lines))
  c.data.dev = write(tmp_path / "dev.tsv", "label\tsentence\n1\tgreat film\n0\tdull mess\n")
  c.data.seq_len, c.data.max_train, c.data.prefetch = 16, 0, 0
  c.train.batch_size, c.train.steps, c.train.warmup_steps, c.train.lr = 8, 3, 1, 1e-2
  c.train.eval_every = c.train.ckpt_every = c.train.log_every = 3
  c.train.progress = False
  wd = tmp_path / "wd"
  last = train(c, wd)
  flat, meta = load_adapters(str(wd / "adapters.safetensors"))
  assert meta["peft.method"] == "lora" and meta["model.init_from"] == tiny_hf_dir
  assert set(k.rsplit("/", 1)[-1] for k in flat) == {"lora_a", "lora_b", "kernel", "bias"}
  assert all(k.startswith("classifier/") or "lora_" in k for k in flat)
  assert json.loads((wd / "labels.json").read_text()) == ["0", "1"]
  # adapters on the HF base weights give the same params as the full trainer checkpoint
  predict, labels, cfg = pred.build_classifier(wd)
  via_adapters = predict(["great film", "dull mess"])
  # the trainer's dev metrics are those of the saved model on the two dev rows (labels 1, 0);
  # rtol: f32 logits of the same params, only the batch's padding and size differ (~1e-6
  # relative on a loss of ~0.7); 1e-4 also admits the eval's own reduction order
  probs, dev_ids = np.asarray(via_adapters), [labels.index("1"), labels.index("0")]
  assert last["eval_accuracy"] == np.mean(probs.argmax(-1) == dev_ids)
  np.testing.assert_allclose(last["eval_loss"], -np.mean(np.log(probs[[0, 1], dev_ids])),
                             rtol=1e-4)
  make = wrap_factory(model_factory(cfg.model, 30522), cfg.peft)
  abstract = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))[1])
  from_adapters = pred.classifier_params(cfg, wd, abstract)
  cfg.peft.method = "full"  # read the same workdir through its full checkpoint instead
  from_ckpt = pred.classifier_params(cfg, wd, abstract)
  assert_trees_equal(from_adapters, from_ckpt)
  # f32 softmax over 2 classes: each row sums to 1 within a couple of eps (~2e-7); 1e-5 ~ 80 eps
  np.testing.assert_allclose(via_adapters.sum(-1), 1.0, rtol=1e-5)
  # HF export folds LoRA into the kernels: the exported classifier predicts the same
  from lmos_jax.convert import to_hf_from_workdir
  from lmos_jax.models.hf import load_hf
  from lmos_jax.data.encoder import encode_for_classifier
  hf_model = load_hf(to_hf_from_workdir(wd, tmp_path / "hf_out"))
  enc = encode_for_classifier(load_pretrained(tiny_hf_dir), ["great film", "dull mess"], None,
                              16)
  logits = hf_model(enc["inputs"], token_type_ids=enc["token_type_ids"],
                    attention_mask=enc["attention_mask"])
  # probabilities in [0, 1]: kernels with LoRA folded in (W + s A B, one rounding per weight)
  # vs adapters applied beside them, through 2 layers: ~1e-7; 1e-5 leaves 100x
  np.testing.assert_allclose(np.asarray(jax.nn.softmax(logits, -1)), via_adapters, atol=1e-5)
  assert pred.main(["lmos predict", "--workdir", str(wd), "great film"]) == 0
  label, prob, text = capsys.readouterr().out.strip().splitlines()[-1].split("\t")
  assert label in labels and text == "great film"
  np.testing.assert_allclose(float(prob), via_adapters[0].max(), atol=1e-4)  # printed .4f: 5e-5
  # `lmos compress` folds the LoRA updates into the kernels (here stored as bf16): a full run
  # predicting as the adapted model does, within bf16's rounding (2^-9 relative per operand)
  from lmos_jax.inference.compress_run import compress_to_workdir
  compress_to_workdir(str(wd), "bf16", str(tmp_path / "bf16"))
  folded = pred.load_classifier(tmp_path / "bf16")
  assert folded.cfg.peft.method == "full"
  assert np.abs(folded.predict(["great film", "dull mess"]) - via_adapters).max() < 0.02
