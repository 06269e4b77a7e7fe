"""`lmos predict --input`: batch prediction from TSV/CSV/JSONL/text files and streamed stdin.

One tiny BERT classifier is finetuned once for the module (its config.json stripped of
`data.buckets`, as a workdir written before buckets existed). In-process runs share one loaded
classifier (one jitted forward, so each batch shape compiles once); the stdin test starts the
real `lmos predict` in a subprocess and reads a result before closing its input.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from helpers import subprocess_env
from lmos_jax import cli
from lmos_jax.config.schema import base_config
from lmos_jax.inference import predict as pred

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["negative", "positive"]
GOOD = ["a great , moving film", "wonderful acting", "a joy to watch", "great fun"]
BAD = ["dull and bad", "awful mess", "a boring waste", "bad acting"]
LONG = ("the film is great fun and the acting is wonderful , a joy to watch from the first "
        "scene to the last , moving and funny and sad and true , with a score that lifts "
        "every moment and a cast that never puts a foot wrong , truly wonderful work")
# lengths from 3 to past seq_len (48) tokens: batches land in several bucket widths
SENTENCES = ["great film", "dull mess", "a wonderful , moving film about a joy of a family",
             "awful and boring and bad , a waste of time from start to finish , sadly",
             "not bad", LONG, "the acting is awful", " ".join(LONG.split()[:20]), "fun",
             " ".join(LONG.split()[:30]), "bad film , bad acting", "a joy",
             "great acting in a dull and boring film", " ".join(LONG.split()[:38])]
GOLD = ["positive", "negative", "positive", "negative", "positive", "positive", "negative",
        "positive", "positive", "positive", "negative", "positive", "negative", "negative"]
BATCH = 4
# probabilities in [0, 1] of the same f32 model on the same tokens: batching, packing and
# width cutting change only summation order (measured <= 1.5e-6 with this wide-weight
# model); records round to 6 decimals (5e-7); 1e-5 leaves ~5x
ATOL = 1e-5


def write(path: Path, data: str | bytes) -> Path:
  path.write_bytes(data.encode() if isinstance(data, str) else data)
  return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny random BERT classifier (MiniLM's tokenizer) made a workdir by `lmos convert
  --from-hf`, with labels.json, data.seq_len 48 and no data.buckets in its config.json (a
  workdir written before buckets existed). Weights drawn wide (init_std 0.5) so that
  probabilities spread over both labels (0.26 to 0.86 on SENTENCES). No training: `lmos
  train` on 8 simulated devices takes ~30 s, this file's whole budget."""
  from lmos_jax.convert import from_hf_to_workdir
  from lmos_jax.models.bert import BERT
  from lmos_jax.models.hf import copy_tokenizer, minilm_dir, save_hf, spec_from_lmos_config
  tmp = tmp_path_factory.mktemp("predict_batch")
  m = base_config().model
  m.arch, m.num_layers, m.num_heads, m.d_model, m.d_ff, m.max_seq_len = "bert", 2, 2, 32, 64, 64
  m.vocab_size, m.norm_eps, m.mlp, m.head, m.num_labels = 30522, 1e-12, "gelu_exact", "cls", 2
  m.init_std = 0.5  # at BERT's 0.02 a random encoder gives every sentence ~ the same probs
  spec = spec_from_lmos_config(m, 30522)
  params = nnx.to_pure_dict(nnx.split(BERT(spec.tcfg, head="cls", rngs=nnx.Rngs(3)))[1])
  hf = save_hf(spec, params, tmp / "hf")
  copy_tokenizer(minilm_dir(), hf)
  wd, _ = from_hf_to_workdir(hf, tmp / "wd")
  (wd / "labels.json").write_text(json.dumps(LABELS))
  saved = json.loads((wd / "config.json").read_text())
  saved["data"]["seq_len"] = 48
  saved["data"].pop("buckets", None)  # an older workdir: predict must default to 'auto'
  (wd / "config.json").write_text(json.dumps(saved))
  return wd


@pytest.fixture(scope="module")
def clf(workdir):
  return pred.load_classifier(workdir)


@pytest.fixture
def shared(clf, monkeypatch):
  """In-process `lmos predict` uses the module's classifier (compiled shapes are reused);
  every batch the forward sees is recorded."""
  shapes = []

  def forward_packed(batch):
    shapes.append(batch["inputs"].shape)
    return clf.forward_packed(batch)
  monkeypatch.setattr(pred, "load_classifier", lambda wd: pred.Classifier(
      clf.cfg, clf.tokenizer, clf.labels, clf.forward, forward_packed))
  return shapes


def one_by_one(clf, texts):
  return np.stack([clf.predict([s])[0] for s in texts])


def run_main(capsys, *args) -> tuple[int, str, str]:
  capsys.readouterr()
  rc = cli.main(["predict", *map(str, args)])
  out, err = capsys.readouterr()
  return rc, out, err


def records(text: str) -> list[dict]:
  return [json.loads(line) for line in text.splitlines()]


def check_predictions(recs, texts, clf):
  want = one_by_one(clf, texts)
  assert [r["text"] for r in recs] == list(texts)
  for r, p in zip(recs, want):
    assert r["label"] == clf.labels[int(p.argmax())], (r, p)
    np.testing.assert_allclose([r["probs"][n] for n in clf.labels], p, atol=ATOL)
    assert r["score"] == r["probs"][r["label"]]


def test_tsv_batches_match_sentence_predictions_in_order(workdir, clf, shared, capsys,
                                                         tmp_path, monkeypatch):
  assert "buckets" not in json.loads((workdir / "config.json").read_text())["data"]
  monkeypatch.setattr(pred, "CHUNK_BATCHES", 2)  # chunks of 8 rows: order across chunks too
  tsv = write(tmp_path / "in.tsv", "label\tsentence\n" + "".join(
      f"{g}\t{s}\n" for s, g in zip(SENTENCES, GOLD)))
  out = tmp_path / "out.jsonl"
  rc, stdout, err = run_main(capsys, "--workdir", workdir, "--input", tsv, "--output", out,
                             "--batch-size", BATCH)
  assert rc == 0, err
  assert stdout == ""
  recs = records(out.read_text())
  assert len(recs) == len(SENTENCES)
  check_predictions(recs, SENTENCES, clf)
  assert [r["gold"] for r in recs] == GOLD
  # fixed shapes: the rows of a chunk run rows_per_batch(BATCH) = 1 at a time, each row at
  # the narrowest bucket width that holds it (auto: several)
  assert {s[0] for s in shared} == {1} and len(set(shared)) > 1, shared
  assert {s[1] for s in shared} <= {16, 24, 32, 48}, shared
  # the summary line against numpy on the records
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(f"lmos predict: {len(SENTENCES)} lines "
                                                 "(0 errors) in "), lines
  m = re.search(r"accuracy ([\d.]+), macro-F1 ([\d.]+) over (\d+) labelled lines", lines[0])
  assert m, lines[0]
  gold = np.array([r["gold"] for r in recs])
  label = np.array([r["label"] for r in recs])
  assert set(label) == set(LABELS)  # both labels predicted: macro-F1 averages two real F1s
  f1 = []
  for name in LABELS:  # F1 = harmonic mean of precision and recall (0 when undefined)
    tp = np.sum((label == name) & (gold == name))
    prec = tp / max(np.sum(label == name), 1)
    rec = tp / max(np.sum(gold == name), 1)
    f1.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
  # printed with 4 decimals: rounding <= 5e-5
  assert abs(float(m.group(1)) - np.mean(gold == label)) <= 5e-5
  assert abs(float(m.group(2)) - np.mean(f1)) <= 5e-5
  assert int(m.group(3)) == len(SENTENCES)


def test_packed_batches_equal_one_text_per_row(clf):
  """classify_rows packs several texts into a row; the probabilities are those of each text
  alone in a row padded to seq_len (`Classifier.predict`), sentence pairs included."""
  from lmos_jax.data.encoder import bucket_widths, row_lengths
  seq_len = clf.cfg.data.seq_len
  widths = pred.batch_widths(clf.cfg)  # the config has no data.buckets: auto
  assert widths == bucket_widths("auto", seq_len) == [16, 24, 32, 48]
  lengths = row_lengths(clf.encode(SENTENCES))
  assert lengths.min() < 16 and lengths.max() == seq_len  # LONG is cut to seq_len
  packed = pred.classify_rows(clf, SENTENCES, None, BATCH, widths)
  np.testing.assert_allclose(packed, clf.predict(SENTENCES), atol=ATOL)
  np.testing.assert_allclose(pred.classify_rows(clf, SENTENCES, None, BATCH, [seq_len]),
                             packed, atol=ATOL)
  short = [s for s in SENTENCES if len(s.split()) <= 3]  # 5 texts: one row of 24 holds them
  np.testing.assert_allclose(pred.run_packed(clf, short, None, widths, 8, 8)[0],
                             clf.predict(short), atol=ATOL)
  pairs = ["and so it goes"] * len(SENTENCES)
  np.testing.assert_allclose(pred.classify_rows(clf, SENTENCES, pairs, BATCH, widths),
                             clf.predict(SENTENCES, pairs), atol=ATOL)
  # the workdir's default can be overridden from the command line too
  assert pred.batch_widths(clf.cfg, "off") == [seq_len]


def test_bad_lines_are_error_records_in_place(workdir, clf, shared, capsys, tmp_path):
  # plain text: empty, blank, invalid UTF-8, 100,001 bytes; 100,000 bytes is still a text
  lines = [b"great film", b"", b"   ", b"caf\xe9 \xff bad", b"x" * 100_001, b"dull mess\r",
           b"y" * 100_000, b"a joy"]  # the last line has no line break
  txt = write(tmp_path / "lines.txt", b"\n".join(lines))
  rc, out, err = run_main(capsys, "--workdir", workdir, "--input", txt, "--batch-size", BATCH)
  assert rc == 0, err
  recs = records(out)
  assert len(recs) == len(lines)
  bad = {1: "empty text", 2: "empty text", 3: "not valid UTF-8", 4: "100001 bytes"}
  for i, r in enumerate(recs):
    if i in bad:
      assert set(r) == {"error"} and bad[i] in r["error"] and f"line {i + 1}" in r["error"], r
  assert "100000-byte limit" in recs[4]["error"]
  good = [i for i in range(len(lines)) if i not in bad]
  check_predictions([recs[i] for i in good], ["great film", "dull mess", "y" * 100_000, "a joy"],
                    clf)
  assert f"lmos predict: {len(lines)} lines (4 errors)" in err and "accuracy" not in err

  # JSONL: not JSON, not an object, no text field, empty text, blank line, text not a string
  jl = ['{"text": "great film", "label": "positive"}', "not json", "[1, 2]", '{"foo": "x"}',
        '{"sentence": ""}', '{"sentence": "dull mess", "label": "negative"}', "",
        '{"text": 5}', '{"review": "a joy", "label": "positive", "id": 7}']
  rc, out, err = run_main(capsys, "--workdir", workdir, "--input",
                          write(tmp_path / "in.jsonl", "\n".join(jl) + "\n"))
  assert rc == 0, err
  recs = records(out)
  assert len(recs) == len(jl)
  bad = {1: "not valid JSON", 2: "a JSON list", 3: "no text field", 4: "empty text",
         6: "empty line", 7: "is a int"}
  for i, r in enumerate(recs):
    if i in bad:
      assert set(r) == {"error"} and bad[i] in r["error"], r
  check_predictions([recs[0], recs[5], recs[8]], ["great film", "dull mess", "a joy"], clf)
  assert [recs[i]["gold"] for i in (0, 5, 8)] == ["positive", "negative", "positive"]
  assert f"lmos predict: {len(jl)} lines (6 errors)" in err and "over 3 labelled lines" in err

  # CSV: quoted commas, an invalid UTF-8 row, a blank row; no label column (no gold)
  csv = write(tmp_path / "in.csv", b'id,text\n1,"a great, moving film"\n2,bad \xff\n\n'
                                   b'3,"dull mess"\n')
  rc, out, err = run_main(capsys, "--workdir", workdir, "--input", csv)
  assert rc == 0, err
  recs = records(out)
  assert "not valid UTF-8" in recs[1]["error"] and "empty text" in recs[2]["error"]
  check_predictions([recs[0], recs[3]], ["a great, moving film", "dull mess"], clf)
  assert "gold" not in recs[0] and "accuracy" not in err


@pytest.mark.parametrize("name,data,expect", [
    ("missing.tsv", None, ["no such file"]),
    ("nocol.tsv", "foo\tbar\tlabel\nx\ty\tpositive\n", ["cannot tell the text column",
                                                        "['foo', 'bar', 'label']"]),
    ("gold.tsv", "sentence\tlabel\ngreat\tpositive\nbad\tmaybe\n",
     ["line 3", "'maybe'", "['negative', 'positive']"]),
    ("gold.jsonl", '{"text": "great", "label": "positive"}\n{"text": "bad", "label": 1}\n',
     ["line 2", "'1'", "['negative', 'positive']"]),
    ("fields.tsv", "sentence\tlabel\ngreat\tpositive\nbad\n", ["fields.tsv:3", "1 fields"]),
    ("fields.csv", "sentence,label\ngreat,positive,extra\n", ["fields.csv:2", "3 fields"]),
])
def test_bad_files_fail_before_the_model_loads(workdir, capsys, tmp_path, monkeypatch,
                                               name, data, expect):
  def no_model(wd):
    raise AssertionError("the model was loaded for a bad input file")
  monkeypatch.setattr(pred, "load_classifier", no_model)
  path = tmp_path / name if data is None else write(tmp_path / name, data)
  out = tmp_path / "out.jsonl"
  rc, stdout, err = run_main(capsys, "--workdir", workdir, "--input", path, "--output", out)
  lines = [line for line in err.splitlines() if line.strip()]
  assert rc == 2 and "Traceback" not in err, err
  assert len(lines) == 1 and lines[0].startswith("lmos predict: "), lines
  for text in expect:
    assert text in lines[0], (text, lines[0])
  assert stdout == "" and not out.exists()  # nothing written, no output file clobbered


def test_existing_output_is_kept_without_force(workdir, capsys, tmp_path, monkeypatch):
  monkeypatch.setattr(pred, "load_classifier", lambda wd: pytest.fail("model loaded"))
  txt = write(tmp_path / "in.txt", "great\n")
  out = write(tmp_path / "out.jsonl", "earlier results\n")
  rc, _, err = run_main(capsys, "--workdir", workdir, "--input", txt, "--output", out)
  assert rc == 2 and "already exists" in err and "--force" in err
  assert Path(out).read_text() == "earlier results\n"


def test_stdin_is_streamed(workdir, clf):
  """A result comes back while stdin is still open; closing stdin ends the run (exit 0)."""
  proc = subprocess.Popen(
      [sys.executable, "-m", "lmos_jax.cli", "predict", "--workdir", str(workdir), "--input",
       "-", "--batch-size", str(BATCH)], cwd=ROOT, env=subprocess_env(1),
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  lines: queue.Queue = queue.Queue()
  threading.Thread(target=lambda: [lines.put(x) for x in iter(proc.stdout.readline, b"")],
                   daemon=True).start()
  try:
    got = []
    for text in ("great film", "dull mess"):
      proc.stdin.write(text.encode() + b"\n")
      proc.stdin.flush()
      try:
        got.append(json.loads(lines.get(timeout=120)))
      except queue.Empty:
        pytest.fail(f"no result for {text!r} within 120 s while stdin was open")
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-3000:]
    err = proc.stderr.read().decode()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  check_predictions(got, ["great film", "dull mess"], clf)
  assert "lmos predict: 2 lines (0 errors)" in err, err


def test_sentence_embeddings_match_transformers_mean_pooling(workdir, clf):
  """classify_embed_rows: the probs of classify_rows, and embeddings equal to the masked
  mean of transformers' BertModel last_hidden_state, L2-normalised (atol 1e-5, float32)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  widths = pred.batch_widths(clf.cfg)
  probs, emb = pred.classify_embed_rows(clf, SENTENCES, None, BATCH, widths)
  np.testing.assert_allclose(probs, pred.classify_rows(clf, SENTENCES, None, BATCH, widths),
                             atol=1e-6)
  model = transformers.BertModel.from_pretrained(workdir.parent / "hf").eval()
  enc = clf.encode(SENTENCES)
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(enc["inputs"]),
                attention_mask=torch.as_tensor(enc["attention_mask"]),
                token_type_ids=torch.as_tensor(enc["token_type_ids"])).last_hidden_state.numpy()
  m = enc["attention_mask"][..., None].astype(np.float32)
  ref = (out * m).sum(1) / m.sum(1)
  ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
  np.testing.assert_allclose(emb, ref, atol=1e-5)
  assert np.allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)


def test_classifier_uses_the_runs_compile_cache(clf):
  """Loading a classifier points JAX's persistent cache at the run's cache (here the test
  run's LMOS_COMPILE_CACHE), so a second `lmos predict` reads its programs back."""
  import os
  import jax
  assert jax.config.jax_enable_compilation_cache
  assert jax.config.jax_compilation_cache_dir == os.environ["LMOS_COMPILE_CACHE"]
