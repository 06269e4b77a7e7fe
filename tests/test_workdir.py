"""The run directory (lmos_jax.workdir) and what reads it: a finetuned classifier exported
with `lmos convert --to-hf` predicts the same in transformers from its folder alone,
tokenizers export with identical ids, generate/predict need no training data, params are
restored without the optimizer state, and `--from-hf` never writes over a run."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import tiny_config
from lmos_jax import workdir as W
from lmos_jax.config.schema import base_config
from lmos_jax.data.errors import DataError
from lmos_jax.errors import UserError

LABELS = ["negative", "positive"]
GOOD = ["a great , moving film", "wonderful acting", "a joy to watch", "great fun"]
BAD = ["dull and bad", "awful mess", "a boring waste", "bad acting"]
SENTENCES = ["great film", "dull mess", "wonderful , moving", "awful and boring",
             "a joy", "a waste of time", "great acting", "bad film", "moving", "boring",
             "the film is great fun", "the acting is awful", "not bad", "not great",
             "a wonderful mess", "fun", "dull", "a very , very , very long sentence that "
             "goes on well past the sixteen tokens a row holds", "", "joy and waste"]
PAIRS = [("great film", "a waste"), ("dull", "wonderful acting and a joy to watch , truly "
                                     "wonderful from start to finish"),
         ("awful mess", "bad"), ("a joy", "great fun")]
TEXTS = ["Hello world", "  leading spaces\n\nnew lines\ttabs ", "naïve café 漢字 🙂 ✓ Ωmega",
         "unseen: #@$%^&*~`|", "", "<|endoftext|> and <|pad|> as plain text"]
DOCS = ["Hello world, it's a test.\nSecond line\twith a tab",
        "naïve café — 漢字 and ünïcödé", "more text for the merges " * 20]


def write(path, text: str) -> str:
  path.write_text(text)
  return str(path)


@pytest.fixture(scope="module")
def cls_run(tiny_hf_dir, tmp_path_factory):
  """A tiny BERT classifier finetuned by `lmos train` (full), its TSV files deleted after."""
  from lmos_jax.models.hf import apply_hf_model_config
  from lmos_jax.train.trainer import train
  tmp = tmp_path_factory.mktemp("cls")
  c = base_config()
  c.task = "cls"
  c.model.num_labels = 2
  apply_hf_model_config(tiny_hf_dir, c.model)
  d, t = c.data, c.train
  d.tokenizer, d.tokenizer_path, d.labels = "pretrained", tiny_hf_dir, ",".join(LABELS)
  rows = [f"{s}\tpositive" for s in GOOD] * 3 + [f"{s}\tnegative" for s in BAD] * 3
  d.train = write(tmp / "train.tsv", "sentence\tlabel\n" + "\n".join(rows))
  d.dev = write(tmp / "dev.tsv", "label\tsentence\npositive\tgreat film\nnegative\tdull mess\n")
  d.seq_len, d.prefetch = 16, 0
  t.batch_size, t.steps, t.warmup_steps, t.lr, t.schedule = 8, 30, 0, 1e-2, "constant"
  t.weight_decay, t.eval_every, t.ckpt_every, t.log_every = 0.0, 30, 30, 30
  t.sample_tokens, t.progress = 0, False
  wd = tmp / "wd"
  train(c, wd)
  for f in (d.train, d.dev):  # predict and convert must not need the training data
    Path(f).unlink()
  return wd


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
  """A tiny char-level GPT trained by `lmos train` on a text file that is deleted after.
  Its layers are unscanned (as configs/shakespeare_char.py has them): layer keys are ints
  in the live state and strings in orbax's files, and reading back must agree on both."""
  from lmos_jax.train.trainer import train
  tmp = tmp_path_factory.mktemp("lm")
  c = tiny_config()
  c.model.scan_layers = False
  c.data.source, c.data.tokenizer = "text", "char"
  c.data.path = write(tmp / "text.txt", "the quick brown fox jumps over the lazy dog.\n" * 60)
  wd = tmp / "wd"
  train(c, wd)
  (tmp / "text.txt").unlink()
  return wd


# ------------------------------------------------------------------ (a) HF export of a classifier


def test_classifier_export_predicts_like_lmos_in_transformers(cls_run, tmp_path):
  """transformers' AutoTokenizer + AutoModelForSequenceClassification on OUT alone give
  lmos predict's labels; probabilities agree to 1e-4 (f32, two implementations)."""
  import torch
  from transformers import AutoModelForSequenceClassification, AutoTokenizer
  from lmos_jax.cli import main
  from lmos_jax.data.encoder import encode_for_classifier
  from lmos_jax.inference.predict import build_classifier

  out = tmp_path / "hf"
  assert main(["convert", "--to-hf", str(out), "--workdir", str(cls_run)]) == 0
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json"} <= {p.name for p in out.iterdir()}
  predict, labels, cfg = build_classifier(cls_run)
  assert labels == LABELS
  hf_tok = AutoTokenizer.from_pretrained(out)
  model, info = AutoModelForSequenceClassification.from_pretrained(out,
                                                                   output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert model.config.id2label == dict(enumerate(LABELS))
  assert model.config.label2id == {n: i for i, n in enumerate(LABELS)}
  lmos_tok = W.read_tokenizer(cls_run)
  for a, b in [(SENTENCES, None), ([p[0] for p in PAIRS], [p[1] for p in PAIRS])]:
    enc = hf_tok(a, b, padding="max_length", truncation=True, return_tensors="pt")
    rows = encode_for_classifier(lmos_tok, a, b, cfg.data.seq_len)
    np.testing.assert_array_equal(enc["input_ids"].numpy(), rows["inputs"])
    np.testing.assert_array_equal(enc["token_type_ids"].numpy(), rows["token_type_ids"])
    np.testing.assert_array_equal(enc["attention_mask"].numpy(), rows["attention_mask"])
    with torch.no_grad():  # padded only to the longest row: the masked tail does not matter
      logits = model(**hf_tok(a, b, padding=True, truncation=True, return_tensors="pt")).logits
    hf_probs = torch.softmax(logits, -1).numpy()
    lmos_probs = predict(a, b)
    # torch vs XLA, the same f32 classifier, different reduction orders in every matmul and
    # norm: up to 2.2e-5 measured on this trained head near p = 0.5; a wrong weight, mask or
    # token moves probabilities by > 1e-2, far above 1e-4
    np.testing.assert_allclose(hf_probs, lmos_probs, atol=1e-4)
    assert [model.config.id2label[int(i)] for i in hf_probs.argmax(-1)] == \
        [labels[int(i)] for i in lmos_probs.argmax(-1)]
  # the finetuned head is not constant: the comparison above covers both labels
  assert set(predict(SENTENCES).argmax(-1).tolist()) == {0, 1}


def test_predict_cli_reads_only_the_workdir(cls_run, capsys):
  from lmos_jax.inference.predict import build_classifier, main
  predict, labels, _ = build_classifier(cls_run)
  assert main(["lmos predict", "--workdir", str(cls_run), "great film", "dull mess"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()[-2:]
  want = predict(["great film", "dull mess"])
  for line, row in zip(lines, want):
    label, prob, _ = line.split("\t")
    # the CLI prints 4 decimals: rounding <= 5e-5
    assert label == labels[int(row.argmax())] and abs(float(prob) - row.max()) < 1e-4


# ------------------------------------------------------------------ (b) tokenizer id parity


def _exported(tok, **kw):
  from transformers import AutoTokenizer
  from lmos_jax.data.hf_tokenizer import write_hf_tokenizer
  out = tempfile.mkdtemp()
  try:
    write_hf_tokenizer(tok, out, **{"model_max_length": 64, "classifier": False,
                                    "token_type_ids": False, **kw})
    return AutoTokenizer.from_pretrained(out)
  finally:
    shutil.rmtree(out)


@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "char_mask", "byte_mask"])
def test_tokenizer_export_gives_lmos_ids(kind):
  """AutoTokenizer's call (specials and all) encodes to lmos's ids, non-ASCII, unknown
  characters and the literal text of special tokens included; decode inverts it."""
  from lmos_jax.data.encoder import MaskedTokenizer
  from lmos_jax.data.tokenizer import build_tokenizer
  base = kind.removesuffix("_mask")
  tok = build_tokenizer(base, DOCS, need_specials=not kind.endswith("_mask"),
                        bpe_vocab_size=300)
  if kind.endswith("_mask"):
    tok = MaskedTokenizer(tok)
  hf = _exported(tok)
  assert len(hf) == tok.vocab_size
  for text in TEXTS:
    if base == "char" and tok_base(tok).unknown_chars(text):  # lmos refuses unseen characters
      with pytest.raises(DataError, match="outside the char vocabulary"):
        tok.encode(text)
      continue
    assert hf(text)["input_ids"] == [int(i) for i in tok.encode(text)], (kind, text)
  for role, i in tok.specials.items():
    assert hf.convert_tokens_to_ids(getattr(hf, f"{role}_token")) == i
  assert hf.decode(tok.encode(DOCS[1])) == DOCS[1]  # non-ASCII, in every vocabulary


def tok_base(tok):
  """The char/byte/BPE tokenizer under lmos's [MASK] and specials wrappers."""
  while hasattr(tok, "base"):
    tok = tok.base
  return tok


def test_pretrained_tokenizer_export_adds_classifier_specials_like_lmos():
  """A BERT tokenizer: plain ids equal; as a classifier, pairs get [CLS] a [SEP] b [SEP] with
  token types, cut longest-first where lmos cuts (ties and odd budgets included)."""
  from lmos_jax.data.encoder import encode_for_classifier
  from lmos_jax.data.tokenizer import load_pretrained
  from lmos_jax.models.hf import minilm_dir
  tok = load_pretrained(str(minilm_dir()))
  hf = _exported(tok, model_max_length=12, classifier=True, token_type_ids=True)
  for text in TEXTS:
    assert hf(text, add_special_tokens=False)["input_ids"] == [int(i) for i in tok.encode(text)]
  rng = np.random.default_rng(0)
  words = "the a film great bad dull movie acting wonderful ok".split()
  a = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(60)]
  b = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(60)]
  for pair in (None, b):
    enc = hf(a, pair, padding="max_length", truncation=True)
    rows = encode_for_classifier(tok, a, pair, 12)
    for k, r in (("input_ids", "inputs"), ("token_type_ids", "token_type_ids"),
                 ("attention_mask", "attention_mask")):
      np.testing.assert_array_equal(np.array(enc[k]), rows[r], err_msg=k)


def test_unexportable_tokenizer_is_a_one_line_error():
  from lmos_jax.data.hf_tokenizer import to_hf_tokenizer
  with pytest.raises(UserError, match="has no Hugging Face equivalent"):
    to_hf_tokenizer(object())


# ------------------------------------------------------------------ (d) no data needed


def test_generate_and_lm_export_need_no_data_file(lm_run, tmp_path, capsys):
  from transformers import AutoTokenizer
  from lmos_jax.convert import to_hf_from_workdir
  from lmos_jax.inference.generate import load_trained, main
  assert main(["lmos generate", "--workdir", str(lm_run), "--prompt", "the ",
               "--max-new-tokens", "5", "--temperature", "0"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("the ") and "[5 tokens, max_new_tokens]" in out
  run = load_trained(lm_run)
  hf = AutoTokenizer.from_pretrained(to_hf_from_workdir(lm_run, tmp_path / "hf"))
  for text in ("the lazy fox", "jumps over\nthe dog."):
    assert hf(text)["input_ids"] == [int(i) for i in run.tokenizer.encode(text)]
  with pytest.raises(DataError, match="outside the char vocabulary"):  # no silent id 0
    run.tokenizer.encode("jumps?! ü")
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["architectures"] == ["GPT2LMHeadModel"] and config["vocab_size"] == \
      run.tokenizer.vocab_size


def test_compress_reads_text_only_for_measuring(lm_run, tmp_path):
  """The run's own data block is gone: a clear error; `--data` text is tokenized with the
  run's tokenizer, not a new one fitted to it."""
  from lmos_jax.inference.compress import load_source
  with pytest.raises(UserError, match="data block of .*config.json"):
    load_source(str(lm_run))
  other = write(tmp_path / "other.txt", "the lazy dog. " * 40)  # fewer characters than the run's
  source, params = load_source(str(lm_run), other)
  assert source.data.tokenizer.describe() == W.read_tokenizer(lm_run).describe()
  assert source.data.val_batches() and "embed" in params


# ------------------------------------------------------------------ (e) params only


def _model_paths(tree) -> set[str]:
  from lmos_jax.tree import path_str
  return {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def drop_optimizer_data(item) -> int:
  """Deletes the data chunks of every opt_state array from a saved state (their zarr
  metadata stays): what a half-lost optimizer state looks like to a reader."""
  import tensorstore as ts
  kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item}/"}).result()
  keys = [k for k in kv.list().result()
          if k.startswith(b"opt_state.") and not k.endswith(b"/.zarray")]
  for k in keys:
    kv.delete_range(ts.KvStore.KeyRange(k, k + b"\x00")).result()
  return len(keys)


def test_latest_params_reads_only_params(lm_run, tmp_path):
  """The optimizer state of the newest step loses its data: a full restore fails, while
  latest_params returns exactly the params (the model's tree, nothing else)."""
  wd = tmp_path / "wd"
  shutil.copytree(lm_run, wd)
  want = W.workdir_params(wd)
  cfg, tok = W.read_config(wd), W.read_tokenizer(wd)
  _, abstract = W.model_layout(cfg, tok.vocab_size)
  assert _model_paths(want) == _model_paths(abstract)  # params only, as the model has them
  item = W.step_dir(wd, W.checkpoint_steps(wd)[-1]) / W.STATE_ITEM
  assert drop_optimizer_data(item) > 0
  with pytest.raises(ValueError, match="opt_state.*missing"):
    W.restore_numpy(item)  # reading the whole state now fails
  got = W.latest_params(wd)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(got))
  assert _model_paths(got) == _model_paths(want)  # the same tree, leaf for leaf
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_params_that_differ_from_their_fingerprint_are_refused(lm_run, tmp_path):
  wd = tmp_path / "wd"
  shutil.copytree(lm_run, wd)
  step = W.checkpoint_steps(wd)[-1]
  meta_file = W.step_dir(wd, step) / W.META_ITEM / "metadata"
  meta = json.loads(meta_file.read_text())
  key = next(k for k in meta["fingerprint"] if k.startswith("['params']"))
  meta["fingerprint"][key] ^= 1
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(W.CheckpointError, match="corrupt"):
    W.workdir_params(wd)


def test_read_config_keeps_defaults_for_keys_added_since(lm_run, tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  saved = json.loads((lm_run / W.CONFIG).read_text())
  del saved["model"]["init_std"], saved["train"]
  (wd / W.CONFIG).write_text(json.dumps(saved))
  cfg = W.read_config(wd)
  assert cfg.model.init_std == base_config().model.init_std
  assert cfg.train.to_dict() == base_config().train.to_dict()
  assert cfg.model.d_model == saved["model"]["d_model"]
  with pytest.raises(UserError, match="no config.json"):
    W.read_config(tmp_path)


# ------------------------------------------------------------------ (c) --from-hf never overwrites


def test_from_hf_into_a_run_refuses_without_force(lm_run, tiny_hf_dir, tmp_path, capsys):
  from lmos_jax.cli import main
  wd = tmp_path / "wd"
  shutil.copytree(lm_run, wd)
  before = (wd / W.CONFIG).read_bytes()
  steps = W.checkpoint_steps(wd)
  assert main(["convert", "--from-hf", tiny_hf_dir, "--workdir", str(wd)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "already holds a run" in err and "--force" in err
  assert (wd / W.CONFIG).read_bytes() == before and W.checkpoint_steps(wd) == steps
  assert not (wd / W.PARAMS).exists()
  # --force moves the run aside (never deletes it) and the workdir is the converted model
  assert main(["convert", "--from-hf", tiny_hf_dir, "--workdir", str(wd), "--force"]) == 0
  aside = next(wd.glob("replaced-*"))
  assert (aside / W.CONFIG).read_bytes() == before
  assert W.checkpoint_steps(aside) == steps
  assert W.read_config(wd).model.arch == "bert" and not W.checkpoint_steps(wd)
  assert W.workdir_params(wd)["embed"].shape == (30522, 32)
  assert W.read_tokenizer(wd).vocab_size == 30522  # from hf_tokenizer/
  # --to-hf does not overwrite a folder either
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "config.json").write_text("{}")
  assert main(["convert", "--to-hf", str(tmp_path / "out"), "--workdir", str(wd)]) == 2
  assert (tmp_path / "out" / "config.json").read_text() == "{}"

