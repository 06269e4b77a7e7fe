"""Pretrain your own BERT, then finetune it: configs/bert_mlm.py trains a masked LM into a
workdir, configs/bert_cls.py starts a classifier from that workdir (encoder weights exactly,
fresh pooler and classifier, the workdir's tokenizer); HF folders without a pooler too."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lmos_jax.config.loading import ConfigError, load_config_file, validate
from lmos_jax.errors import UserError
from lmos_jax.models import hf
from lmos_jax.models.bert import bert_config_from, fresh_heads
from lmos_jax.train.init_from import init_from_params, pretrained_train_state
from lmos_jax.workdir import int_keys, workdir_params

GOOD = ["a great , moving film", "wonderful acting", "a joy to watch", "brilliant and warm"]
BAD = ["dull and bad", "awful mess", "a boring waste", "tedious and flat"]


def mlm_config():
  c = load_config_file("configs/bert_mlm.py:tiny")
  c.data.max_chars, c.data.prefetch, c.train.batch_size, c.train.steps = 20_000, 0, 8, 4
  c.train.eval_every = c.train.ckpt_every = c.train.log_every = 4
  c.train.eval_batches = 1
  return c


def cls_config(init_from: str, tmp_path):
  c = load_config_file("configs/bert_cls.py:tiny")
  c.model.init_from = str(init_from)
  rows = [f"{s}\t1" for s in GOOD] * 3 + [f"{s}\t0" for s in BAD] * 3
  (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
  (tmp_path / "dev.tsv").write_text("label\tsentence\n1\tgreat film\n0\tdull mess\n")
  c.data.train, c.data.dev = str(tmp_path / "train.tsv"), str(tmp_path / "dev.tsv")
  c.data.prefetch = 0
  return c


def flat(tree) -> dict[str, np.ndarray]:
  from lmos_jax.tree import path_str
  return {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_masked_lm_runs_build_tokenizers_with_bert_specials(kind):
  from lmos_jax.config.schema import special_set
  from lmos_jax.data.tokenizer import build_tokenizer, tokenizer_from_info
  assert special_set("auto", "mlm") == "bert" and special_set("auto", "lm") == "lm"
  tok = build_tokenizer(kind, ["one text", "and another"], need_specials=False,
                        bpe_vocab_size=300, specials=special_set("auto", "mlm"))
  assert set(tok.specials) == {"pad", "unk", "cls", "sep", "mask"}
  assert sorted(tok.specials.values()) == (list(range(5)) if kind == "bpe" else
                                           list(range(tok.vocab_size - 5, tok.vocab_size)))
  assert tokenizer_from_info(json.loads(json.dumps(tok.describe()))).specials == tok.specials


@pytest.fixture(scope="module")
def mlm_workdir(tmp_path_factory):
  """A few masked-LM steps of the tiny bert_mlm.py run, through `lmos train`'s loop."""
  from lmos_jax.train.trainer import train
  wd = tmp_path_factory.mktemp("bert_mlm")
  train(mlm_config(), wd)
  return wd


def test_mlm_run_keeps_a_tokenizer_a_classifier_can_use(mlm_workdir):
  from tokenizers import Tokenizer

  from lmos_jax.data.tokenizer import load_pretrained
  tok = load_pretrained(str(mlm_workdir))  # the workdir's record of the run's tokenizer
  assert {"cls", "sep", "pad", "mask", "unk"} <= set(tok.specials)
  assert len(set(tok.specials.values())) == len(tok.specials)
  info = json.loads((mlm_workdir / "tokenizer.json").read_text())
  assert info["kind"] == "bpe"
  hf_tok = Tokenizer.from_str(info["hf_tokenizer"])  # as an exported tokenizer.json reads
  ids = hf_tok.encode("wonderful acting").ids
  assert ids[0] == tok.specials["cls"] and ids[-1] == tok.specials["sep"]
  assert list(tok.encode("wonderful acting")) == ids[1:-1]  # the pipeline adds none itself


def test_classifier_finetunes_from_the_mlm_workdir(mlm_workdir, tmp_path, capsys,
                                                   monkeypatch):
  from lmos_jax.inference import predict as pred
  from lmos_jax.train import trainer

  c = cls_config(mlm_workdir, tmp_path)
  starts = []

  def spy(*args):  # the trainer's state right after model.init_from: step 0 of the run
    state = pretrained_train_state(*args)
    starts.append(flat(jax.device_get(state["params"])))
    return state

  monkeypatch.setattr(trainer, "pretrained_train_state", spy)
  wd = tmp_path / "cls"
  trainer.train(c, wd)
  line = f"lmos train: init_from {mlm_workdir}: fresh pooler, classifier; dropped mlm head"
  assert line in capsys.readouterr().out.splitlines()
  (start,) = starts
  source = flat(int_keys(workdir_params(mlm_workdir)))
  encoder = {k for k in start if not k.startswith(("pooler/", "classifier/"))}
  assert encoder == {k for k in source if not k.startswith("mlm_")}
  for k in encoder:  # step 0 of the finetune is the MLM run's last step, bit for bit
    np.testing.assert_array_equal(start[k], source[k], err_msg=k)
  vocab = source["embed"].shape[0]
  fresh = flat(fresh_heads(bert_config_from(c.model, vocab), ["pooler", "classifier"], c.seed))
  assert set(fresh) == set(start) - encoder
  for k, v in fresh.items():
    np.testing.assert_array_equal(start[k], v, err_msg=k)

  losses = [json.loads(r)["loss"] for r in (wd / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(r)]
  assert len(losses) == c.train.steps
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert first > 0.6 and last < 0.3, (first, last)  # chance level is ln 2 = 0.69
  assert json.loads((wd / "tokenizer.json").read_text()) == json.loads(
      (mlm_workdir / "tokenizer.json").read_text())  # the classifier keeps the MLM tokenizer
  predict, labels, _ = pred.build_classifier(wd)
  probs = predict(["wonderful acting", "awful mess"])
  assert [labels[i] for i in probs.argmax(-1)] == ["1", "0"]


def test_workdir_source_must_match_the_run(mlm_workdir, tmp_path):
  c = cls_config(mlm_workdir, tmp_path)
  c.model.d_model = 32
  with pytest.raises(ConfigError, match=r"model\.d_model=32 \(source 64\)"):
    validate(c, 8)
  c = cls_config(mlm_workdir, tmp_path)
  c.model.d_ff = 96  # the source used the default 4 * d_model = 256
  vocab = int(np.asarray(workdir_params(mlm_workdir)["embed"]).shape[0])
  with pytest.raises(UserError, match=r"param blocks/mlp/(up|down)/kernel has shape "
                                      r"\(2, (64, 256|256, 64)\)"):
    init_from_params(c, vocab)
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text(c.to_json())
  c.model.init_from = str(tmp_path / "empty")
  with pytest.raises(ConfigError, match="workdir without weights"):
    validate(c, 8)


def test_unscanned_run_from_a_scanned_workdir(mlm_workdir, tmp_path):
  c = cls_config(mlm_workdir, tmp_path)
  c.model.scan_layers = False
  source = int_keys(workdir_params(mlm_workdir))
  params, _ = init_from_params(c, int(np.asarray(source["embed"]).shape[0]))
  for i in range(c.model.num_layers):
    np.testing.assert_array_equal(params["blocks"][i]["attn"]["query"]["kernel"],
                                  source["blocks"]["attn"]["query"]["kernel"][i])


def test_classifier_from_hf_masked_lm_folder_without_pooler(tmp_path):
  """A BertForMaskedLM export has no pooler: it starts fresh, like the classifier."""
  c = cls_config(tmp_path / "hf", tmp_path)
  mlm_model = load_config_file("configs/bert_mlm.py:tiny").model
  spec = hf.spec_from_lmos_config(mlm_model, 61)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(np.float32),
                        hf.abstract_params(spec))
  hf.save_hf(spec, params, tmp_path / "hf")
  names = hf.tensor_shapes(tmp_path / "hf")
  assert not any("pooler" in n for n in names) and "cls.predictions.bias" in names
  validate(c, 8)
  loaded, note = init_from_params(c, 61)
  assert note == f"init_from {tmp_path / 'hf'}: fresh pooler, classifier; dropped mlm head"
  got, want = flat(loaded), flat(params)
  for k in got:
    if not k.startswith(("pooler/", "classifier/")):
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  fresh = flat(fresh_heads(bert_config_from(c.model, 61), ["pooler", "classifier"], c.seed))
  for k, v in fresh.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  spec2, _ = hf.load_hf_params(tmp_path / "hf", num_labels=2)  # `lmos convert`, `load_hf`
  assert spec2.head == "cls"
