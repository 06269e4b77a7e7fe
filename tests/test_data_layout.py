"""data.layout: a config's batch layout and vocabulary, known without building the pipeline,
must be what the built pipeline produces (for every task and batching)."""

import json

import numpy as np
import pytest

from lmos_jax.config.loading import validate
from lmos_jax.config.schema import base_config
from lmos_jax.data.layout import batch_spec, vocab_size
from lmos_jax.models.hf import minilm_dir
from lmos_jax.train.trainer import build_task_data

DOCS = [f"doc {i}: " + "a quick brown fox " * (i % 4 + 1) for i in range(24)]


def cfg_with(tmp_path, task="lm", **data):
  c = base_config()
  c.task = task
  c.data.seq_len = c.model.max_seq_len = 16
  c.data.max_chars, c.train.batch_size, c.train.eval_batches = 5_000, 4, 1
  if task != "lm":
    c.model.arch, c.model.mlp = "bert", "gelu_exact"
  for k, v in data.items():
    c.data[k] = v
  return c


def texts(tmp_path, n_files: int) -> str:
  """n text files (one document each) in their own folder; returns their glob."""
  folder = tmp_path / f"texts{n_files}"
  folder.mkdir()
  for i in range(n_files):
    (folder / f"t{i}.txt").write_text(" ".join(DOCS[i::n_files]))
  return str(folder / "t*.txt")


def jsonl(tmp_path) -> str:
  p = tmp_path / "docs.jsonl"
  p.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
  return str(p)


def cases(tmp_path) -> dict:
  cls = cfg_with(tmp_path, "cls", tokenizer="pretrained", tokenizer_path=str(minilm_dir()))
  cls.model.num_labels = 2
  cls.data.train = str(tmp_path / "train.tsv")
  cls.data.dev = str(tmp_path / "dev.tsv")
  (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "good\t1\nbad\t0\n" * 3)
  (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
  glob = texts(tmp_path, 2)
  return {
      "random, embedded": cfg_with(tmp_path),
      "windows, embedded": cfg_with(tmp_path, batching="windows"),
      "packed, files": cfg_with(tmp_path, batching="packed", source="files", path=jsonl(tmp_path)),
      "random, two text files": cfg_with(tmp_path, source="text", path=glob),
      "random, one text file, char": cfg_with(tmp_path, source="text", path=texts(tmp_path, 1),
                                              tokenizer="char"),
      "random mixture": cfg_with(tmp_path, mixture=({"source": "text", "path": glob},
                                                    {"source": "embedded"})),
      "streaming windows": cfg_with(tmp_path, batching="windows", source="files",
                                    path=jsonl(tmp_path), streaming=True),
      "mlm, windows": cfg_with(tmp_path, "mlm", batching="windows"),
      "mlm, random": cfg_with(tmp_path, "mlm"),
      "cls": cls,
  }


@pytest.mark.parametrize("name", ["random, embedded", "windows, embedded", "packed, files",
                                  "random, two text files", "random, one text file, char",
                                  "random mixture", "streaming windows", "mlm, windows",
                                  "mlm, random", "cls"])
def test_layout_is_what_the_pipeline_builds(name, tmp_path):
  cfg = cases(tmp_path)[name]
  validate(cfg, 1)
  data = build_task_data(cfg)
  got = {k: (v.shape, v.dtype) for k, v in data.train_batch(0).items()}  # one process
  assert {k: (a.shape, a.dtype) for k, a in batch_spec(cfg).items()} == got
  assert vocab_size(cfg) == data.tokenizer.vocab_size


def test_vocab_of_byte_windows_needs_no_corpus(tmp_path):
  """Joined documents always get the specials: the files are never opened."""
  cfg = cfg_with(tmp_path, batching="windows", source="text", path=str(tmp_path / "none.txt"))
  assert vocab_size(cfg) == 256 + 3
  cfg.task, cfg.model.arch = "mlm", "bert"
  assert vocab_size(cfg) == 256 + 5  # BERT's five specials, [MASK] among them
  with pytest.raises(FileNotFoundError):  # building the pipeline does read them
    build_task_data(cfg)


def test_single_text_keeps_the_bare_byte_vocabulary(tmp_path):
  assert vocab_size(cfg_with(tmp_path)) == 256
  assert batch_spec(cfg_with(tmp_path))["inputs"] == ((4, 16), np.dtype(np.int32))
