"""`lmos serve` over real HTTP, and the customer-service answer logic under it.

One tiny random BERT classifier workdir (no training) is served by a real `lmos serve`
subprocess on a free 127.0.0.1 port and driven with httpx: every endpoint, batching of
concurrent requests (counted on /metrics), each class of malformed request, and SIGTERM
draining a request in flight. The 503 test runs the app in uvicorn on a thread of this process
with a slowed model, so the queue fills on purpose. Unit tests check the answer policy, the
threshold choice, knowledge-base reading and caching, and top-k cosine search against numpy.
Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import portpicker
import pytest

from helpers import subprocess_env, tiny_classifier_workdir
from lmos_jax.apps.retrieval import (KBEntry, Match, load_or_build, read_kb, top_k_cosine)
from lmos_jax.apps.service import AnswerPolicy, choose_threshold, read_answers
from lmos_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["card_arrival", "card_linking", "exchange_rate", "lost_or_stolen_card"]
TEMPLATES = {"card_linking": "Add the card under Accounts, then Link.",
             "exchange_rate": "We use the interbank rate of the moment you pay."}
INTENT_THRESHOLD = 0.8  # the random model's confidences on QUESTIONS spread round it
KB = [("how do I change my pin", "Open Cards, then PIN, in the app."),
      ("my card was stolen", "Freeze the card in the app at once, then order a new one."),
      ("what exchange rate do you use", "The interbank rate of the moment you pay."),
      ("can I link my card to another bank", "Yes: add it under Accounts, then Link.")]
MAX_BATCH = 8
START_TIMEOUT_S = 180  # jax import, model load and 4 warm-up compiles on a loaded machine
HTTP_TIMEOUT_S = 60
# same f32 model, same tokens: the server's batch of 8 rows at a bucket width against one
# in-process batch at seq_len changes summation order only (~1e-6 seen); 1e-5 leaves margin
ATOL = 1e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("serve")
  wd = tiny_classifier_workdir(tmp, LABELS, seq_len=32, buckets="16,32")
  answers = tmp / "answers.jsonl"
  answers.write_text("".join(json.dumps({"intent": k, "answer": v}) + "\n"
                             for k, v in TEMPLATES.items()))
  kb = tmp / "kb.tsv"
  kb.write_text("question\tanswer\n" + "".join(f"{q}\t{a}\n" for q, a in KB))
  return wd, answers, kb


def start_server(wd: Path, *flags: str) -> tuple[subprocess.Popen, str, Path]:
  """A `lmos serve` subprocess on a free port, once /healthz answers; its log file."""
  port = portpicker.pick_unused_port()
  log = wd.parent / f"serve_{port}.log"
  proc = subprocess.Popen(
      [sys.executable, "-m", "lmos_jax.cli", "serve", "--workdir", str(wd), "--port",
       str(port), *flags], cwd=ROOT, env=subprocess_env(1, PYTHONPATH=str(ROOT)),
      stdout=subprocess.DEVNULL, stderr=log.open("w"))
  url = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + START_TIMEOUT_S
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"lmos serve exited {proc.returncode}:\n{log.read_text()}")
    try:
      if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
        return proc, url, log
    except httpx.TransportError:
      pass
    time.sleep(0.2)
  proc.kill()
  raise AssertionError(f"lmos serve did not answer in {START_TIMEOUT_S} s:\n{log.read_text()}")


def stop(proc: subprocess.Popen) -> None:
  if proc.poll() is None:
    proc.kill()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(files):
  """Templates when the predicted intent has one at >= INTENT_THRESHOLD, else the best
  retrieved answer (retrieval threshold -1)."""
  wd, answers, kb = files
  proc, url, log = start_server(wd, "--answers", str(answers), "--kb", str(kb),
                                "--max-batch", str(MAX_BATCH), "--max-wait-ms", "100",
                                "--intent-threshold", str(INTENT_THRESHOLD), "--retrieval-threshold", "-1",
                                "--top-k", "2", "--max-texts", "4")
  yield url, log
  stop(proc)


def metric(url: str, name: str) -> float:
  text = httpx.get(f"{url}/metrics", timeout=HTTP_TIMEOUT_S).text
  m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
  assert m, f"{name} not in /metrics"
  return float(m.group(1))


# ----------------------------------------------------------------- over HTTP


def test_healthz_and_classify_match_the_model(server, files):
  from lmos_jax.inference.predict import load_classifier
  url, _ = server
  assert httpx.get(f"{url}/healthz", timeout=HTTP_TIMEOUT_S).json() == {
      "status": "ok", "model": "wd", "task": "cls"}
  texts = ["where is my new card?", "what rate do you use to exchange euros to dollars"]
  r = httpx.post(f"{url}/v1/classify", json={"texts": texts}, timeout=HTTP_TIMEOUT_S)
  assert r.status_code == 200, r.text
  preds = r.json()["predictions"]
  want = load_classifier(files[0]).predict(texts)
  assert len(preds) == 2
  for p, w in zip(preds, want):
    got = np.array([p["probs"][name] for name in LABELS])
    np.testing.assert_allclose(got, w, atol=ATOL)
    assert p["label"] == LABELS[int(np.argmax(w))] and p["score"] == max(p["probs"].values())


def test_answer_sources_follow_the_policy(server):
  url, _ = server
  questions = ["where is my card", "my card got stolen yesterday", "exchange rate please",
               "link my card", "how do I change my pin number", "card arrival time"]
  sources = set()
  for q in questions:
    r = httpx.post(f"{url}/v1/answer", json={"question": q}, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, r.text
    a = r.json()
    assert a["intent"] in LABELS and 0 < a["confidence"] <= 1
    scores = [m["score"] for m in a["matches"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    assert all(m["text"] in dict(KB) and m["answer"] == dict(KB)[m["text"]]
               for m in a["matches"])
    if a["intent"] in TEMPLATES and a["confidence"] >= INTENT_THRESHOLD:
      assert (a["source"], a["answer"]) == ("template", TEMPLATES[a["intent"]])
    else:
      assert (a["source"], a["answer"]) == ("retrieval", a["matches"][0]["answer"])
    sources.add(a["source"])
  assert sources == {"template", "retrieval"}, "the questions should reach both sources"


def test_generate_on_a_classifier_is_a_clear_404(server):
  url, _ = server
  r = httpx.post(f"{url}/v1/generate", json={"prompt": "hi"}, timeout=HTTP_TIMEOUT_S)
  assert r.status_code == 404
  assert "language-model workdir" in r.json()["error"]


def test_concurrent_requests_share_batches(server):
  """16 requests sent together run in fewer model batches than requests (100 ms window)."""
  url, log = server
  before = metric(url, "lmos_serve_batches_total")

  async def burst():
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
      return await asyncio.gather(*[
          client.post(f"{url}/v1/classify", json={"texts": [f"where is card number {i}"]})
          for i in range(16)])
  responses = asyncio.run(burst())
  assert [r.status_code for r in responses] == [200] * 16
  batches = metric(url, "lmos_serve_batches_total") - before
  assert 1 <= batches < 16, f"{batches} batches for 16 concurrent requests"
  assert re.search(r"batch: \d+ requests, \d+ rows", log.read_text())


@pytest.mark.parametrize("path,body,status,words", [
    ("/v1/classify", b"{not json", 400, "not JSON"),
    ("/v1/classify", b"[1, 2]", 400, "JSON object"),
    ("/v1/classify", b'{"texts": "one string"}', 422, "list of strings"),
    ("/v1/classify", b'{"texts": []}', 422, "empty"),
    ("/v1/classify", b'{"texts": ["ok", 3]}', 422, "texts[1]"),
    ("/v1/classify", b'{"texts": ["   "]}', 422, "texts[0]"),
    ("/v1/classify", json.dumps({"texts": ["a"] * 5}).encode(), 413, "at most 4"),
    ("/v1/classify", json.dumps({"texts": ["a" * 2001]}).encode(), 413, "2001 characters"),
    ("/v1/answer", b'{"text": "where is my card"}', 422, "question"),
    ("/v1/answer", b'{"question": null}', 422, "question"),
    ("/v1/nothing", b"{}", 404, "Not Found"),
])
def test_malformed_requests_are_4xx_json(server, path, body, status, words):
  url, _ = server
  r = httpx.post(f"{url}{path}", content=body, timeout=HTTP_TIMEOUT_S)
  assert r.status_code == status, r.text
  assert words in r.json()["error"]
  assert httpx.get(f"{url}/healthz", timeout=HTTP_TIMEOUT_S).status_code == 200


def test_wrong_method_is_405_json(server):
  url, _ = server
  r = httpx.get(f"{url}/v1/classify", timeout=HTTP_TIMEOUT_S)
  assert r.status_code == 405 and "error" in r.json()


def test_sigterm_finishes_the_request_in_flight(files):
  """The request waits in a 3 s batching window when SIGTERM arrives: it is answered and
  the server exits 0."""
  proc, url, log = start_server(files[0], "--max-wait-ms", "3000", "--max-batch",
                                str(MAX_BATCH))
  try:
    result = {}

    def ask():
      result["r"] = httpx.post(f"{url}/v1/classify", json={"texts": ["where is my card"]},
                               timeout=HTTP_TIMEOUT_S)
    t = threading.Thread(target=ask)
    t.start()
    time.sleep(1.0)  # the request is queued, inside its batching window
    assert "r" not in result
    proc.send_signal(signal.SIGTERM)
    t.join(HTTP_TIMEOUT_S)
    assert result["r"].status_code == 200, result["r"].text
    assert proc.wait(timeout=HTTP_TIMEOUT_S) == 0, log.read_text()
  finally:
    stop(proc)


def test_full_queue_answers_503_with_retry_after(files):
  """A model slowed to 0.3 s per batch, 1 row per batch and 2 queue places: of 10 requests
  sent together one runs, two wait, the rest are refused at once."""
  from lmos_jax.inference.predict import batch_widths, load_classifier
  from lmos_jax.serve.server import ClassifierEngine, create_app
  clf = load_classifier(files[0])
  fast = clf.forward_packed

  def slow(batch):
    time.sleep(0.3)
    return fast(batch)
  engine = ClassifierEngine(dataclasses.replace(clf, forward_packed=slow),
                            batch_widths(clf.cfg), 1, AnswerPolicy({}, 0.5, 0.5))
  app = create_app(engine, model_name="slow", max_batch=1, max_wait_s=0.0, queue_size=2)
  with serving(app) as url:
    async def burst():
      async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        return await asyncio.gather(*[
            client.post(f"{url}/v1/classify", json={"texts": ["where is my card"]})
            for _ in range(10)])
    responses = asyncio.run(burst())
  codes = [r.status_code for r in responses]
  busy = [r for r in responses if r.status_code == 503]
  assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
  assert busy[0].headers["retry-after"] == "1" and "busy" in busy[0].json()["error"]


@contextlib.contextmanager
def serving(app):
  """`app` under uvicorn on a thread of this process, on a free port; stopped after."""
  import uvicorn
  port = portpicker.pick_unused_port()
  srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                      access_log=False))
  thread = threading.Thread(target=srv.run, daemon=True)
  thread.start()
  try:
    deadline = time.monotonic() + HTTP_TIMEOUT_S
    while not srv.started and time.monotonic() < deadline and thread.is_alive():
      time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
  finally:
    srv.should_exit = True
    thread.join(HTTP_TIMEOUT_S)
  assert not thread.is_alive()


@pytest.mark.parametrize("method", [None, "int4:group=8"])
def test_generate_serves_a_decoder_workdir(tmp_path, method):
  """A tiny char GPT (random weights), as trained or as `lmos compress --method` wrote it:
  /v1/generate answers, its bad requests are 422, and the classifier endpoints say which
  workdir they need."""
  from helpers import tiny_gpt_workdir
  from lmos_jax.inference.compress_run import compress_to_workdir
  from lmos_jax.inference.generate import load_trained
  from lmos_jax.models.decode import Decoder
  from lmos_jax.serve.server import GeneratorEngine, create_app
  wd = tiny_gpt_workdir(tmp_path / "wd", "abcdefghijklmnopqrstuvwxyz .\n", 2)
  if method:
    compress_to_workdir(str(wd), method, str(tmp_path / "compressed"))
    wd = tmp_path / "compressed"
  run = load_trained(wd)
  app = create_app(GeneratorEngine(run, Decoder(run.graphdef, run.cfg.model.max_seq_len)),
                   model_name="lm", max_batch=8, max_wait_s=0.0, queue_size=4)
  with serving(app) as url:
    r = httpx.post(f"{url}/v1/generate", json={"prompt": "the ", "max_new_tokens": 5,
                                               "temperature": 0}, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, r.text
    g = r.json()
    assert 1 <= g["tokens"] <= 5 and g["status"] in ("max_new_tokens", "stop_token")
    assert len(g["text"]) == g["tokens"]  # a char model: one character per token
    bad = httpx.post(f"{url}/v1/generate", json={"prompt": "the ", "max_new_tokens": -1},
                     timeout=HTTP_TIMEOUT_S)
    assert bad.status_code == 422 and "max_new_tokens" in bad.json()["error"]
    unknown = httpx.post(f"{url}/v1/generate", json={"prompt": "\u00e9t\u00e9"},
                         timeout=HTTP_TIMEOUT_S)
    assert unknown.status_code == 422 and "prompt" in unknown.json()["error"]
    cls = httpx.post(f"{url}/v1/classify", json={"texts": ["x"]}, timeout=HTTP_TIMEOUT_S)
    assert cls.status_code == 404 and "classifier workdir" in cls.json()["error"]
    assert httpx.get(f"{url}/healthz", timeout=HTTP_TIMEOUT_S).json()["task"] == "lm"


# ----------------------------------------------------------------- the answer logic


def test_answer_policy_order_and_thresholds():
  policy = AnswerPolicy({"card_arrival": "T"}, intent_threshold=0.8, retrieval_threshold=0.6)
  good = [Match("q1", "A1", 0.7), Match("q2", "A2", 0.65)]
  weak = [Match("q1", "A1", 0.59)]
  assert policy.decide("card_arrival", 0.8, good)["source"] == "template"  # >= is enough
  assert policy.decide("card_arrival", 0.8, good)["answer"] == "T"
  r = policy.decide("card_arrival", 0.79, good)
  assert (r["source"], r["answer"]) == ("retrieval", "A1")
  r = policy.decide("exchange_rate", 0.99, good)  # confident, but no template
  assert (r["source"], r["answer"]) == ("retrieval", "A1")
  r = policy.decide("exchange_rate", 0.99, weak)
  assert (r["source"], r["answer"]) == ("handoff", None)
  assert policy.decide("card_arrival", 0.1, [])["source"] == "handoff"
  assert r["matches"] == [{"text": "q1", "answer": "A1", "score": 0.59}]


def test_choose_threshold_hand_example():
  # scores best first: 0.9 ok, 0.8 ok, 0.7 wrong, 0.6 ok, 0.5 wrong
  # precision at >= 0.9, 0.8, 0.7, 0.6, 0.5: 1, 1, 2/3, 3/4, 3/5
  scores = np.array([0.5, 0.9, 0.6, 0.8, 0.7])
  correct = np.array([False, True, True, True, False])
  assert choose_threshold(scores, correct, 0.75) == 0.6  # the lowest reaching 3/4
  assert choose_threshold(scores, correct, 0.8) == 0.8
  assert choose_threshold(scores, correct, 0.6) == 0.5
  none = choose_threshold(scores, np.zeros(5, bool), 0.5)
  assert none > 0.9  # nothing accepted
  # a tie is accepted or refused as a whole: 0.8 twice, one wrong -> precision 2/3 there
  assert choose_threshold(np.array([0.9, 0.8, 0.8]), np.array([True, True, False]), 0.9) == 0.9


def test_top_k_cosine_matches_numpy():
  rng = np.random.default_rng(0)
  index = rng.normal(size=(200, 16)).astype(np.float32)
  index /= np.linalg.norm(index, axis=1, keepdims=True)
  query = rng.normal(size=(5, 16)).astype(np.float32)
  query /= np.linalg.norm(query, axis=1, keepdims=True)
  scores, idx = top_k_cosine(index, query, 4)
  sim = query.astype(np.float64) @ index.astype(np.float64).T
  want_idx = np.argsort(-sim, axis=1)[:, :4]
  np.testing.assert_array_equal(idx, want_idx)
  # f32 dot products of unit vectors of length 16: ~1e-7 rounding; 1e-5 leaves margin
  np.testing.assert_allclose(scores, np.take_along_axis(sim, want_idx, 1), atol=1e-5)
  s_all, _ = top_k_cosine(index[:3], query, 10)  # k capped at the index size
  assert s_all.shape == (5, 3)


def test_kb_files_read_and_bad_lines_named(tmp_path):
  tsv = tmp_path / "kb.tsv"
  tsv.write_text("answer\tquestion\nA one\tQ one\n\nA two\tQ two\n")
  assert read_kb(tsv) == [KBEntry("Q one", "A one"), KBEntry("Q two", "A two")]
  jl = tmp_path / "kb.jsonl"
  jl.write_text('{"question": "Q", "answer": "A"}\n{"question": "", "answer": "A"}\n')
  with pytest.raises(UserError, match=r"kb\.jsonl line 2: .*non-empty"):
    read_kb(jl)
  bad = tmp_path / "bad.tsv"
  bad.write_text("q\ta\nx\ty\n")
  with pytest.raises(UserError, match="must name a 'question' and an 'answer'"):
    read_kb(bad)
  with pytest.raises(UserError, match="no such file"):
    read_kb(tmp_path / "missing.jsonl")


def test_answers_file_checks_intents(tmp_path):
  p = tmp_path / "a.jsonl"
  p.write_text('{"intent": "card_arrival", "answer": "soon"}\n')
  assert read_answers(p, LABELS) == {"card_arrival": "soon"}
  p.write_text('{"intent": "card_arival", "answer": "soon"}\n')
  with pytest.raises(UserError, match=r"line 1: intent 'card_arival' is not a label"):
    read_answers(p, LABELS)
  p.write_text('{"intent": "card_arrival", "answer": "a"}\n'
               '{"intent": "card_arrival", "answer": "b"}\n')
  with pytest.raises(UserError, match="line 2: a second answer"):
    read_answers(p, LABELS)


def test_index_is_saved_and_rebuilt_when_the_kb_or_model_changes(tmp_path):
  kb = tmp_path / "kb.jsonl"
  kb.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in KB))
  calls = []

  def embed(questions):
    calls.append(list(questions))
    e = np.array([[len(q), q.count(" "), 1.0] for q in questions], np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)
  index, rebuilt = load_or_build(tmp_path, kb, "model-a", embed)
  assert rebuilt and len(calls) == 1 and len(index.entries) == 4
  assert (tmp_path / "retrieval" / "embeddings.npy").is_file()
  again, rebuilt = load_or_build(tmp_path, kb, "model-a", embed)
  assert not rebuilt and len(calls) == 1
  np.testing.assert_array_equal(np.asarray(again.emb_ND), np.asarray(index.emb_ND))
  _, rebuilt = load_or_build(tmp_path, kb, "model-b", embed)
  assert rebuilt and len(calls) == 2
  kb.write_text(kb.read_text() + json.dumps({"question": "new q", "answer": "new a"}) + "\n")
  index, rebuilt = load_or_build(tmp_path, kb, "model-b", embed)
  assert rebuilt and len(index.entries) == 5 and calls[-1][-1] == "new q"
  best = index.search(embed(["new q"]), 1)[0][0]
  assert (best.text, best.answer) == ("new q", "new a") and best.score == pytest.approx(1, abs=1e-6)


def test_per_label_rows_draws_n_per_label_deterministically():
  from lmos_jax.data.encoder import per_label_rows
  labels = ["a"] * 5 + ["b"] * 3 + ["c"] * 1 + ["a"] * 4
  idx = per_label_rows(labels, 2, seed=7)
  picked = [labels[i] for i in idx]
  assert sorted(picked) == ["a", "a", "b", "b", "c"]  # c has only one row
  np.testing.assert_array_equal(idx, per_label_rows(labels, 2, seed=7))
  assert list(idx) == sorted(idx)


def test_batcher_fills_batches_up_to_max_batch_and_refuses_when_full():
  from lmos_jax.serve.batcher import Batcher, QueueFull
  seen = []

  def run(payloads):
    seen.append(list(payloads))
    if "boom" in payloads:
      raise ValueError("model failed")
    return [p * 10 for p in payloads]

  async def scenario():
    b = Batcher(run, max_batch=4, max_wait_s=1.0, queue_size=16)
    futures = [b.submit(i) for i in range(10)]  # all queued before the worker starts
    b.start()
    results = await asyncio.wait_for(asyncio.gather(*futures), HTTP_TIMEOUT_S)
    failing = b.submit("boom")
    with pytest.raises(ValueError, match="model failed"):
      await asyncio.wait_for(failing, HTTP_TIMEOUT_S)
    b.stop()
    full = Batcher(run, max_batch=4, max_wait_s=0.0, queue_size=2)  # never started
    full.submit(1), full.submit(2)
    with pytest.raises(QueueFull, match="2 requests are waiting"):
      full.submit(3)
    return results
  assert asyncio.run(scenario()) == [i * 10 for i in range(10)]
  assert seen[:3] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and seen[3] == ["boom"]
