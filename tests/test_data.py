"""Data pipeline: sources, tokenizers, windows/packing, sharding, resume, bad input."""

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_tcfg
from lmos_jax.config.datadir import data_file
from lmos_jax.config.loading import ConfigError, validate
from lmos_jax.config.schema import base_config
from lmos_jax.data.build import LMData, MixtureData, build_data
from lmos_jax.data.packing import first_fit_pack, fixed_windows, split_long
from lmos_jax.data.sources import Repairs, SourceSpec, read_documents
from lmos_jax.data.stream import BatchStream, data_state, restore_data_state
from lmos_jax.data.text import CharTokenizer, embedded_corpus
from lmos_jax.data.tokenizer import (bpe_cached, build_tokenizer, load_pretrained,
                                     tokenizer_from_info)
from lmos_jax.models.gpt import GPT
from lmos_jax.models.hf import minilm_dir
from lmos_jax.models.layers import attention_mask
from lmos_jax.train.losses import lm_loss

DOCS = [f"document {i}: " + "the quick brown fox jumps " * (i % 5 + 1) + f"end {i}."
        for i in range(40)]


def write_format(tmp: Path, fmt: str, docs=DOCS, field="text") -> str:
  """The docs as one file of the given format; returns its path."""
  if fmt == "text":
    p = tmp / "docs.txt"
    p.write_text("\n".join(docs) + "\n")
  elif fmt in ("json", "jsonl"):
    p = tmp / f"docs.{fmt}"
    p.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
  elif fmt == "parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = tmp / "docs.parquet"
    pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), p)
  elif fmt in ("csv", "tsv"):
    import csv
    p = tmp / f"docs.{fmt}"
    with open(p, "w", newline="") as f:
      w = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
      w.writerow(["id", field])
      w.writerows([i, d] for i, d in enumerate(docs))
  return str(p)


def data_cfg(batch_size=8, seq_len=32, **data):
  c = base_config()
  c.data.seq_len = c.model.max_seq_len = seq_len
  c.train.batch_size, c.train.eval_batches = batch_size, 2
  for k, v in data.items():
    c.data[k] = v
  return c


# ---------------------------------------------------------------- sources

@pytest.mark.parametrize("fmt", ["text", "json", "jsonl", "parquet", "csv", "tsv"])
def test_each_local_format_reads_every_document(tmp_path, fmt):
  path = write_format(tmp_path, fmt)
  docs, val = read_documents(SourceSpec(kind="files", path=path), Repairs())
  assert docs == DOCS and val is None


def test_glob_reads_files_in_sorted_order(tmp_path):
  for i in (2, 0, 1):
    (tmp_path / f"part{i}.jsonl").write_text(
        "".join(json.dumps({"body": f"p{i} d{j}"}) + "\n" for j in range(3)))
  docs, _ = read_documents(SourceSpec(kind="files", path=str(tmp_path / "part*.jsonl"),
                                      text_field="body"), Repairs())
  assert docs == [f"p{i} d{j}" for i in range(3) for j in range(3)]


def test_hub_path_with_local_builder_and_dataset_dir(tmp_path):
  """source=hf goes through datasets.load_dataset(name, split=...) like a hub dataset."""
  write_format(tmp_path, "jsonl")
  via_builder, _ = read_documents(SourceSpec(kind="hf", hf_name="json",
                                             path=str(tmp_path / "docs.jsonl")), Repairs())
  via_dir, _ = read_documents(SourceSpec(kind="hf", hf_name=str(tmp_path)), Repairs())
  assert via_builder == DOCS and via_dir == DOCS


def test_hub_validation_split(tmp_path):
  (tmp_path / "train.jsonl").write_text(json.dumps({"text": "a b c"}) + "\n")
  (tmp_path / "validation.jsonl").write_text(json.dumps({"text": "v w"}) + "\n")
  docs, val = read_documents(SourceSpec(kind="hf", hf_name=str(tmp_path),
                                        hf_val_split="validation"), Repairs())
  assert docs == ["a b c"] and val == ["v w"]


def test_default_config_random_windows_of_the_embedded_corpus():
  """Default config: embedded corpus, byte vocab 256, the first 90% of the tokens for training,
  and each row a window of it starting where the (seed, step)-seeded generator says."""
  c = data_cfg(seq_len=16)
  c.data.max_chars = 20_000
  d = build_data(c)
  assert isinstance(d, LMData) and d.tokenizer.vocab_size == 256
  ids = np.frombuffer(embedded_corpus(20_000).encode("utf-8"), np.uint8).astype(np.int64)
  train = ids[:len(ids) - int(len(ids) * 0.1)]
  starts = np.random.default_rng([c.seed, 5]).integers(0, len(train) - 17, size=8)
  batch = d.train_batch(5)
  np.testing.assert_array_equal(batch["inputs"], [train[s:s + 16] for s in starts])
  np.testing.assert_array_equal(batch["targets"], [train[s + 1:s + 17] for s in starts])


def test_shakespeare_char_vocab_unchanged():
  text = Path(data_file("tinyshakespeare.txt"))
  if not text.is_file():
    pytest.skip(f"needs {text} (set LMOS_DATA_DIR to the folder holding tinyshakespeare.txt)")
  d = build_data(data_cfg(source="text", path=str(text), tokenizer="char"))
  assert d.tokenizer.vocab_size == 65 == CharTokenizer.fit(text.read_text()).vocab_size


# ---------------------------------------------------------------- tokenizers

def test_bpe_train_then_reload_gives_identical_ids(tmp_path):
  tok = bpe_cached(DOCS, 300, tmp_path)
  files = list(tmp_path.glob("bpe_v300_*.json"))
  assert len(files) == 1
  mtime = files[0].stat().st_mtime_ns
  again = bpe_cached(DOCS, 300, tmp_path)  # the cache, not a retrain
  assert files[0].stat().st_mtime_ns == mtime
  text = "document 7: the quick brown fox jumps end 7. ünïcode ✓"
  np.testing.assert_array_equal(tok.encode(text), again.encode(text))
  np.testing.assert_array_equal(tok.encode(text),
                                tokenizer_from_info(tok.describe()).encode(text))
  assert again.decode(again.encode(text)) == text  # byte-level: lossless
  assert tok.specials == {"eos": 0, "pad": 1, "bos": 2} and tok.vocab_size <= 300
  assert len(list(tmp_path.glob("bpe_v300_*.json"))) == 1
  bpe_cached(DOCS[:10], 300, tmp_path)  # other data: another cache entry
  assert len(list(tmp_path.glob("bpe_v300_*.json"))) == 2


def test_pretrained_minilm_tokenizer_specials_and_no_padding():
  tok = load_pretrained(str(minilm_dir()))
  assert tok.vocab_size == 30522
  assert {k: tok.specials[k] for k in ("pad", "unk", "cls", "sep", "mask")} == {
      "pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
  ids = tok.encode("hello world")
  assert len(ids) == 2 and 0 not in ids  # the file's padding to 128 is switched off
  assert load_pretrained(str(minilm_dir() / "tokenizer.json")).encode("hello").tolist() == \
      tok.encode("hello").tolist()


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_char_and_byte_append_specials_after_base_vocab(kind):
  tok = build_tokenizer(kind, ["abc", "cab"], need_specials=True)
  base = 3 if kind == "char" else 256
  assert tok.vocab_size == base + 3 and tok.specials == {"eos": base, "pad": base + 1,
                                                         "bos": base + 2}
  assert tok.decode(list(tok.encode("cab")) + [base]) == "cab"
  assert tokenizer_from_info(json.loads(json.dumps(tok.describe()))) == tok


# ---------------------------------------------------------------- windows and packing

def test_fixed_windows_use_every_target_once():
  stream = np.arange(1, 100, dtype=np.int32)
  rows = fixed_windows(stream, 16, pad=0)
  targets = rows["targets"][rows["weights"] > 0]
  np.testing.assert_array_equal(targets, stream[1:])
  np.testing.assert_array_equal(rows["inputs"][rows["weights"] > 0], stream[:-1])


def test_long_document_split_keeps_every_target():
  doc = np.arange(50, dtype=np.int32)
  pieces = split_long(doc, 16)
  assert all(len(p) <= 17 for p in pieces)
  np.testing.assert_array_equal(np.concatenate([p[1:] for p in pieces]), doc[1:])


def packed_docs(rng, n=12, seq_len=16, vocab=61):
  return [rng.integers(1, vocab - 1, size=rng.integers(2, seq_len + 2)).astype(np.int32)
          for _ in range(n)]


def test_packing_mask_never_crosses_documents():
  rng = np.random.default_rng(0)
  docs = packed_docs(rng)
  rows = first_fit_pack(docs, 16, pad=0, open_bins=4)
  seg = rows["segment_ids"]
  assert len(rows["inputs"]) < len(docs)  # several documents share rows
  assert (rows["weights"] > 0).sum() == sum(len(d) - 1 for d in docs)
  idx = np.broadcast_to(np.arange(16), seg.shape)
  mask = np.asarray(attention_mask(jnp.asarray(seg), jnp.asarray(seg), jnp.asarray(idx),
                                   jnp.asarray(idx)))[:, 0]
  same_doc = seg[:, :, None] == seg[:, None, :]
  assert not (mask & ~same_doc).any()  # no query ever sees another document's key
  causal = idx[:, :, None] >= idx[:, None, :]
  np.testing.assert_array_equal(mask, same_doc & causal)
  for r in range(len(seg)):  # positions restart at 0 in every segment
    for s in set(seg[r][seg[r] > 0]):
      np.testing.assert_array_equal(rows["positions"][r][seg[r] == s],
                                    np.arange((seg[r] == s).sum()))


def test_packed_loss_equals_documents_run_separately():
  """Sum of token losses of a packed batch == the same documents, one per row, unpacked."""
  rng = np.random.default_rng(1)
  docs = packed_docs(rng, n=10)
  rows = first_fit_pack(docs, 16, pad=0, open_bins=3)
  graphdef, params = nnx.split(GPT(tiny_tcfg(max_seq_len=16, num_layers=1), rngs=nnx.Rngs(0)))
  loss = jax.jit(lambda p, b: lm_loss(nnx.merge(graphdef, p), b, None)[:2])
  packed_sum, packed_w = loss(params, {k: jnp.asarray(v) for k, v in rows.items()})
  sep = {"inputs": np.zeros((len(docs), 16), np.int32),  # each document alone in its row,
         "targets": np.zeros((len(docs), 16), np.int32),  # trailing padding weighted 0 (the
         "weights": np.zeros((len(docs), 16), np.float32)}  # causal mask hides it)
  for i, d in enumerate(docs):
    sep["inputs"][i, :len(d) - 1], sep["targets"][i, :len(d) - 1] = d[:-1], d[1:]
    sep["weights"][i, :len(d) - 1] = 1.0
  sep_sum, sep_w = loss(params, {k: jnp.asarray(v) for k, v in sep.items()})
  assert float(packed_w) == float(sep_w) == sum(len(d) - 1 for d in docs)
  assert len(rows["inputs"]) < len(docs)
  # f32 sums of ~90 token losses (~4 each) from two row layouts (other attention shapes too):
  # reassociation is ~sqrt(n) eps ~ 1e-6 relative typical, <= n eps ~ 1e-5 worst
  np.testing.assert_allclose(float(packed_sum), float(sep_sum), rtol=1e-5)


# ---------------------------------------------------------------- sharding, resume, prefetch

def segment_texts(data, tok) -> list[str]:
  """Each packed segment's tokens (inputs + last target) decoded: the documents in the rows."""
  out = []
  for src in data.sources:
    t = src.train
    for r in range(len(t["inputs"])):
      for s in sorted(set(t["segment_ids"][r][t["segment_ids"][r] > 0])):
        m = t["segment_ids"][r] == s
        ids = list(t["inputs"][r][m]) + [t["targets"][r][m][-1]]
        out.append(tok.decode(ids[:-1]))  # drop the EOS
  return out


def test_two_process_sharding_covers_every_document_once(tmp_path):
  path = write_format(tmp_path, "jsonl")
  cfg = data_cfg(batch_size=8, seq_len=256, source="files", path=path, tokenizer="char",
                 batching="packed")
  hosts = [build_data(cfg, i, 2) for i in range(2)]
  seen = segment_texts(hosts[0], hosts[0].tokenizer) + segment_texts(hosts[1],
                                                                     hosts[1].tokenizer)
  n_train = len(DOCS) - 4  # val_fraction 0.1: the 4 tail documents are validation
  assert sorted(seen) == sorted(DOCS[:n_train])
  for h in hosts:  # one epoch of train_batch is a permutation of the host's rows
    n = h.sources[0].num_rows
    steps = -(-n // h.local_batch)
    got = np.concatenate([h.train_batch(s)["inputs"] for s in range(steps)])[:n]
    assert sorted(map(bytes, got)) == sorted(map(bytes, h.sources[0].train["inputs"]))


def test_resume_mid_epoch_gives_identical_next_batches(tmp_path):
  path = write_format(tmp_path, "parquet")
  cfg = data_cfg(batch_size=4, seq_len=32, source="files", path=path, tokenizer="bpe",
                 bpe_vocab_size=300, batching="packed")
  first = build_data(cfg, workdir=tmp_path)
  n = first.sources[0].num_rows
  stop = n // first.local_batch // 2 + 1  # mid-epoch, and the run continues into epoch 2
  uninterrupted = [first.train_batch(s) for s in range(stop + n)]
  saved = json.loads(json.dumps(data_state(first, stop)))  # as it travels in the checkpoint
  assert saved["rows_consumed"] == [stop * 4] and saved["epoch"] == [stop * 4 // n]
  resumed = build_data(cfg, workdir=tmp_path)  # a new process: cached BPE, rebuilt stream
  restore_data_state(resumed, saved, stop)
  stream = BatchStream(resumed.train_batch, stop, stop + n, depth=3)
  for s, b in zip(range(stop, stop + n), stream):
    for k in b:
      np.testing.assert_array_equal(b[k], uninterrupted[s][k], err_msg=f"step {s} {k}")
  changed = build_data(data_cfg(batch_size=4, seq_len=32, source="files", path=path,
                                tokenizer="byte", batching="packed"))
  with pytest.raises(ValueError, match="data state differs"):
    restore_data_state(changed, saved, stop)


def test_mixture_follows_weights_and_is_deterministic(tmp_path):
  a = tmp_path / "a.txt"
  b = tmp_path / "b.jsonl"
  a.write_text("aaaa aaaa\n" * 300)
  b.write_text("".join(json.dumps({"text": "bbbb"}) + "\n" for _ in range(300)))
  cfg = data_cfg(batch_size=16, seq_len=16, tokenizer="byte", batching="windows",
                 mixture=({"source": "text", "path": str(a), "weight": 3.0},
                          {"source": "files", "path": str(b), "weight": 1.0}))
  validate(cfg, 8)
  d = build_data(cfg)
  assert isinstance(d, MixtureData) and len(d.sources) == 2
  a_id = ord("a")
  rows = np.concatenate([d.train_batch(s)["inputs"] for s in range(40)])
  from_a = (rows == a_id).any(1).mean()
  assert abs(from_a - 0.75) < 0.05  # 640 rows: 3 sigma is about 0.05
  again = build_data(cfg)
  np.testing.assert_array_equal(again.train_batch(17)["inputs"], d.train_batch(17)["inputs"])
  assert len(d.val_batches()) == 2 and d.val_batches()[0]["inputs"].shape == (16, 16)


def test_batch_stream_counts_the_time_next_blocks():
  """wait_seconds (the numerator of data_wait_frac) holds the time spent inside next(): at
  least the batch function's own sleep when batches are made inline, at most the wall time."""
  import time

  def slow(step):
    time.sleep(0.05)
    return {"inputs": np.full((2, 3), step)}

  stream = BatchStream(slow, 0, 4, depth=0)
  t0 = time.perf_counter()
  got = [int(b["inputs"][0, 0]) for b in stream]
  wall = time.perf_counter() - t0
  assert got == [0, 1, 2, 3]
  assert 4 * 0.05 <= stream.wait_seconds <= wall


def test_batch_stream_prefetches_in_order_and_raises_at_the_failing_step():
  made = []

  def fn(step):
    made.append(step)
    if step == 3:
      raise ValueError("bad row at step 3")
    return {"inputs": np.full((1, 2), step)}

  stream = BatchStream(fn, 1, 6, depth=2)
  assert [int(next(stream)["inputs"][0, 0]) for _ in range(2)] == [1, 2]
  with pytest.raises(ValueError, match="step 3"):
    next(stream)
  assert made[:4] == [1, 2, 3, 4]  # one thread, in step order
  assert [int(b["inputs"][0, 0]) for b in stream] == [4, 5]


# ---------------------------------------------------------------- bad input

def test_missing_file_and_empty_glob_name_the_field(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"'data.path'.*no such file"):
    build_data(data_cfg(source="text", path=str(tmp_path / "nope.txt")))
  with pytest.raises(FileNotFoundError, match=r"'data.path'.*glob matches no files"):
    build_data(data_cfg(source="files", path=str(tmp_path / "*.jsonl")))


def test_empty_dataset_and_missing_text_field(tmp_path):
  (tmp_path / "blank.txt").write_text("\n  \n\n")
  with pytest.raises(ValueError, match="no non-empty documents"):
    build_data(data_cfg(source="files", path=str(tmp_path / "blank.txt")))
  path = write_format(tmp_path, "jsonl", field="body")
  with pytest.raises(ValueError, match=r"'data.text_field'='text' is not a column.*body"):
    build_data(data_cfg(source="files", path=path))


def test_non_utf8_is_repaired_and_counted_or_refused(tmp_path, caplog):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"good line\nbad \xff\xfe bytes\n")
  with caplog.at_level(logging.WARNING, logger="lmos_jax.data"):
    repairs = Repairs()
    docs, _ = read_documents(SourceSpec(kind="files", path=str(bad)), repairs)
  assert docs == ["good line", "bad \ufffd\ufffd bytes"]
  assert repairs["invalid UTF-8 bytes replaced by U+FFFD"] == 2
  assert "invalid UTF-8" in caplog.text
  repairs = Repairs()
  text_docs, _ = read_documents(SourceSpec(kind="text", path=str(bad)), repairs)
  assert repairs["invalid UTF-8 bytes replaced by U+FFFD"] == 2 and "\ufffd" in text_docs[0]
  badj = tmp_path / "bad.jsonl"
  badj.write_bytes(b'{"text": "ok \xff"}\n')
  with pytest.raises(ValueError, match=r"not valid UTF-8 \(byte 13\)"):
    read_documents(SourceSpec(kind="files", path=str(badj)), Repairs())


def test_empty_documents_and_long_documents_are_counted(tmp_path):
  docs = ["short one", "", "   ", "x" * 100, "another"]
  p = write_format(tmp_path, "jsonl", docs=docs)
  d = build_data(data_cfg(seq_len=16, source="files", path=p, tokenizer="byte",
                          batching="packed", val_fraction=0.0))
  assert d.repairs["empty documents skipped"] == 2
  assert d.repairs["documents longer than the window (seq_len=16) split into pieces"] == 1
  t = d.sources[0].train  # every target of the 3 kept documents (+EOS each) is present
  assert t["weights"].sum() == len("short one") + 100 + len("another")


def test_tokenizer_larger_than_model_embedding(tmp_path):
  from lmos_jax.train.trainer import build_run
  c = data_cfg(source="text", path=write_format(tmp_path, "text"), tokenizer="byte")
  c.model.vocab_size = 100
  with pytest.raises(ConfigError, match=r"256 ids but 'model.vocab_size'=100"):
    build_run(c, jax.devices()[:1])


def test_config_errors_name_the_field():
  c = data_cfg(batching="shuffled")
  with pytest.raises(ConfigError, match="data.batching"):
    validate(c, 8)
  c = data_cfg(mixture=({"source": "text", "paht": "x"},))
  with pytest.raises(ConfigError, match=r"data.mixture\[0\].*unknown keys \['paht'\]"):
    validate(c, 8)
  c = data_cfg(mixture=({"source": "text", "path": "x", "weight": 0},))
  with pytest.raises(ConfigError, match=r"data.mixture\[0\].weight"):
    validate(c, 8)
  with pytest.raises(ConfigError, match="data.tokenizer_path"):
    validate(data_cfg(tokenizer="pretrained"), 8)
  with pytest.raises(ConfigError, match="data.hf_name"):
    validate(data_cfg(source="hf"), 8)


# ---------------------------------------------------------------- streaming

def stream_cfg(path, **kw):
  kw = {"shuffle_buffer": 16, **kw}
  return data_cfg(batch_size=4, seq_len=32, source="files", path=path, tokenizer="byte",
                  batching="packed", streaming=True, **kw)


def test_streaming_is_deterministic_and_resumes_exactly(tmp_path):
  from lmos_jax.data.streaming import StreamingData
  path = write_format(tmp_path, "jsonl")
  live = build_data(stream_cfg(path))
  assert isinstance(live, StreamingData)
  want = [live.train_batch(s) for s in range(30)]  # several epochs of 36 documents
  resumed = build_data(stream_cfg(path))  # a new process resuming at step 20
  restore_data_state(resumed, json.loads(json.dumps(data_state(live, 20))), 20)
  for s in range(20, 30):
    for k in want[s]:
      np.testing.assert_array_equal(resumed.train_batch(s)[k], want[s][k])
  assert set(want[0]) == {"inputs", "targets", "weights", "segment_ids", "positions"}
  assert len(live.val_batches()) == 2
  with pytest.raises(ValueError, match="data state differs"):
    restore_data_state(build_data(stream_cfg(path, shuffle_buffer=8)),
                       data_state(live, 20), 20)


def test_streaming_two_hosts_cover_every_document_once(tmp_path):
  path = write_format(tmp_path, "jsonl")
  hosts = [build_data(stream_cfg(path), i, 2) for i in range(2)]
  texts = []
  for h in hosts:
    ds = h._split(train=True)
    texts += [ex["text"] for ex in ds]
  val = [ex["text"] for ex in hosts[0]._split(train=False)] + \
      [ex["text"] for ex in hosts[1]._split(train=False)]
  assert sorted(texts + val) == sorted(DOCS) and len(val) == 4  # every 10th validates
  assert not set(texts) & set(val)
