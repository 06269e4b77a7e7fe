"""`lmos serve --workdir DIR`: a finetuned model over HTTP (Starlette app, uvicorn server).

  lmos serve --workdir DIR [--host 127.0.0.1] [--port 8000] [--answers FILE] [--kb FILE]
             [--max-batch 32] [--max-wait-ms 5] [--queue 256]

Endpoints (JSON in and out; every error is {"error": "..."} with a 4xx/5xx status):
  GET  /healthz       {"status": "ok", "model": ..., "task": ...}
  POST /v1/classify   {"texts": [...]} -> {"predictions": [{"label", "score", "probs"}]}
  POST /v1/answer     {"question": ...} -> {"intent", "confidence", "answer", "source",
                      "matches": [{"text", "answer", "score"}]}   (classifier workdirs)
  POST /v1/generate   {"prompt": ..., "max_new_tokens", "temperature", "top_k", "top_p",
                      "seed"} -> {"text", "tokens", "status"}      (language-model workdirs)
  GET  /metrics       Prometheus text: request counts, request latency, batch sizes

Requests that arrive together are batched (lmos_jax.serve.batcher: one worker thread owns
the model). A classifier batch of up to `--max-batch` texts is encoded and packed (several
short texts side by side in a row, each attending to itself only) into the one of a few fixed
(rows, width) shapes that leaves the least padding: every shape the model can see is compiled
once at start-up, so nothing compiles under load. A full queue answers 503 with Retry-After.
SIGTERM (or Ctrl-C) stops accepting connections, finishes the requests in flight and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from lmos_jax.apps.retrieval import Match, RetrievalIndex, load_or_build, read_kb
from lmos_jax.apps.service import AnswerPolicy, read_answers, read_thresholds
from lmos_jax.errors import ArgumentParser, UserError, existing_dir, number
from lmos_jax.serve.batcher import Batcher, BatchStats, QueueFull

log = logging.getLogger("lmos.serve")

# thresholds used when neither a flag nor WORKDIR/answer_thresholds.json gives them
DEFAULT_INTENT_THRESHOLD = 0.5
DEFAULT_RETRIEVAL_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may ask for; more is a 4xx, never a crash or an unbounded batch."""

  max_body_bytes: int = 1 << 20
  max_texts: int = 64
  max_chars: int = 2000
  max_new_tokens: int = 512


class RequestError(Exception):
  """A bad request: answered with `status` and {"error": message}."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


# ----------------------------------------------------------------- request parsing


def parse_body(body: bytes, limits: Limits) -> dict:
  """The request body as a JSON object (413 when too large, 400 when not a JSON object)."""
  if len(body) > limits.max_body_bytes:
    raise RequestError(413, f"request body of {len(body)} bytes exceeds "
                            f"{limits.max_body_bytes}")
  try:
    obj = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RequestError(400, f"request body is not JSON: {e}") from None
  if not isinstance(obj, dict):
    raise RequestError(400, f"request body must be a JSON object, got {type(obj).__name__}")
  return obj


def check_text(value: Any, field: str, limits: Limits) -> str:
  """A non-empty string of at most max_chars characters."""
  if not isinstance(value, str):
    raise RequestError(422, f"\"{field}\" must be a string, got {type(value).__name__}")
  if not value.strip():
    raise RequestError(422, f"\"{field}\" is empty; give some text")
  if len(value) > limits.max_chars:
    raise RequestError(413, f"\"{field}\" has {len(value)} characters; at most "
                            f"{limits.max_chars}")
  return value


def parse_texts(obj: dict, limits: Limits) -> list[str]:
  """/v1/classify's {"texts": [1..max_texts strings]}."""
  texts = obj.get("texts")
  if not isinstance(texts, list):
    raise RequestError(422, "\"texts\" must be a list of strings, e.g. "
                            "{\"texts\": [\"where is my card?\"]}")
  if not texts:
    raise RequestError(422, "\"texts\" is empty; give at least one text")
  if len(texts) > limits.max_texts:
    raise RequestError(413, f"\"texts\" has {len(texts)} entries; at most {limits.max_texts} "
                            "per request")
  return [check_text(t, f"texts[{i}]", limits) for i, t in enumerate(texts)]


def parse_generate(obj: dict, limits: Limits) -> dict:
  """/v1/generate's prompt and sampling settings, type- and range-checked."""
  out = {"prompt": check_text(obj.get("prompt"), "prompt", limits)}
  spec = {"max_new_tokens": (int, 64, 0, limits.max_new_tokens),
          "temperature": (float, 0.8, 0.0, None), "top_k": (int, 0, 0, None),
          "top_p": (float, 1.0, 0.0, 1.0), "seed": (int, 0, None, None)}
  for name, (kind, default, low, high) in spec.items():
    v = obj.get(name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and
                                                                   not isinstance(v, int)):
      raise RequestError(422, f"\"{name}\" must be {'an integer' if kind is int else 'a number'}")
    if (low is not None and v < low) or (high is not None and v > high):
      raise RequestError(422, f"\"{name}\"={v} is outside [{low}, {high if high is not None else 'inf'}]")
    out[name] = kind(v)
  return out


# ----------------------------------------------------------------- engines


@dataclasses.dataclass
class ClassifierEngine:
  """A classifier and its answer policy: `run` takes ("classify" | "answer", texts) payloads
  and returns per payload (probs (n, C), matches per text or None)."""

  clf: Any
  widths: list[int]
  max_batch: int
  policy: AnswerPolicy
  index: RetrievalIndex | None = None
  top_k: int = 3
  task = "cls"

  def embed_rows(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(probs (N, C), embeddings (N, D)): max_batch texts at a time, each batch packed into
    the fixed shape that leaves the least padding."""
    from lmos_jax.inference.predict import run_packed
    return run_packed(self.clf, list(texts), None, self.widths, self.max_batch, self.max_batch)

  def warmup(self) -> None:
    """Compiles the forward at every packed (rows, width) shape and the top-k search at
    (max_batch, D), so that no request waits on a compile."""
    from lmos_jax.data.packing import pack_shapes
    from lmos_jax.inference.predict import empty_packed_batch
    for shape in pack_shapes(self.widths, self.max_batch):
      self.clf.forward_packed(empty_packed_batch(shape, self.max_batch))
    if self.index is not None:
      self.index.search(np.zeros((self.max_batch, self.clf.cfg.model.d_model), np.float32),
                        self.top_k)

  def run(self, payloads: list[tuple[str, list[str]]]) -> list[tuple[np.ndarray, Any]]:
    texts = [t for _, ts in payloads for t in ts]
    probs_NC, emb_ND = self.embed_rows(texts)
    out, lo = [], 0
    want = [mode == "answer" for mode, ts in payloads for _ in ts]
    matches = self._search(emb_ND[np.asarray(want, bool)]) if any(want) else []
    it = iter(matches)
    for mode, ts in payloads:
      rows = slice(lo, lo + len(ts))
      lo += len(ts)
      out.append((probs_NC[rows], [next(it) for _ in ts] if mode == "answer" else None))
    return out

  def _search(self, emb_QD: np.ndarray) -> list[list[Match]]:
    """Top-k matches per query, queried in blocks of max_batch rows (one compiled shape)."""
    if self.index is None:
      return [[] for _ in range(len(emb_QD))]
    out = []
    for lo in range(0, len(emb_QD), self.max_batch):
      block = emb_QD[lo:lo + self.max_batch]
      padded = np.zeros((self.max_batch, emb_QD.shape[1]), np.float32)
      padded[:len(block)] = block
      out += self.index.search(padded, self.top_k)[:len(block)]
    return out


@dataclasses.dataclass
class GeneratorEngine:
  """A language model: `run` decodes each payload's prompt in turn (KV-cache decoder; its
  prompt-length buckets compile on first use)."""

  trained: Any
  decoder: Any
  task = "lm"

  def warmup(self) -> None:
    pass

  def run(self, payloads: list[dict]) -> list[dict | RequestError]:
    """One result per payload: the generation, or the RequestError of a prompt the model
    cannot take (characters outside its vocabulary, longer than its cache)."""
    from lmos_jax.models.decode import Sampling
    tok = self.trained.tokenizer
    out: list[dict | RequestError] = []
    for p in payloads:
      try:
        ids = list(tok.encode(p["prompt"]))
        if len(ids) > self.decoder.cache_len:
          raise UserError(f"the prompt has {len(ids)} tokens; the model holds "
                          f"{self.decoder.cache_len}")
      except UserError as e:
        out.append(RequestError(422, f"\"prompt\": {e}"))
        continue
      gen = self.decoder.generate(self.trained.params, [ids], p["max_new_tokens"],
                                  sampling=Sampling(p["temperature"], p["top_k"], p["top_p"]),
                                  seed=p["seed"])
      out.append({"text": tok.decode(gen.tokens[0]), "tokens": len(gen.tokens[0]),
                  "status": gen.status[0]})
    return out


# ----------------------------------------------------------------- metrics


@dataclasses.dataclass
class Metrics:
  """Prometheus metrics in a registry of this app's own (two apps in one process, as in the
  tests, do not share counts)."""

  registry: Any
  requests: Any
  latency: Any
  batches: Any
  batch_rows: Any
  batch_seconds: Any

  @classmethod
  def create(cls) -> "Metrics":
    from prometheus_client import CollectorRegistry, Counter, Histogram
    reg = CollectorRegistry()
    return cls(
        reg,
        Counter("lmos_serve_requests", "HTTP requests by endpoint and status",
                ["endpoint", "status"], registry=reg),
        Histogram("lmos_serve_request_seconds", "request latency, arrival to response",
                  ["endpoint"], registry=reg,
                  buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)),
        Counter("lmos_serve_batches", "model batches run", registry=reg),
        Histogram("lmos_serve_batch_rows", "rows (texts) per model batch", registry=reg,
                  buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)),
        Histogram("lmos_serve_batch_seconds", "model time per batch", registry=reg,
                  buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5)))

  def on_batch(self, stats: BatchStats) -> None:
    self.batches.inc()
    self.batch_rows.observe(stats.rows)
    self.batch_seconds.observe(stats.run_s)


# ----------------------------------------------------------------- the app


def create_app(engine: ClassifierEngine | GeneratorEngine, *, model_name: str,
               max_batch: int, max_wait_s: float, queue_size: int,
               limits: Limits = Limits()):
  """The Starlette app serving `engine`; its lifespan starts and drains the batch worker."""
  from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
  from starlette.applications import Starlette
  from starlette.requests import Request
  from starlette.responses import JSONResponse, Response
  from starlette.routing import Route

  metrics = Metrics.create()
  batcher = Batcher(engine.run, max_batch=max_batch if engine.task == "cls" else 1,
                    max_wait_s=max_wait_s, queue_size=queue_size, on_batch=metrics.on_batch)

  def endpoint(name: str, task: str | None,
               handle: Callable[[Request], Awaitable[dict]]) -> Callable:
    async def route(request: Request) -> Response:
      start = time.perf_counter()
      headers = {}
      try:
        if task is not None and engine.task != task:
          raise RequestError(404, f"{name} needs a {TASK_NAMES[task]} workdir; this server "
                                  f"holds a {TASK_NAMES[engine.task]} (task "
                                  f"{engine.task!r}): use {TASK_ENDPOINTS[engine.task]}")
        status, body = 200, await handle(request)
      except RequestError as e:
        status, body = e.status, {"error": str(e)}
      except QueueFull as e:
        status, body = 503, {"error": f"server busy: {e}; retry shortly"}
        headers["Retry-After"] = "1"
      except Exception as e:  # a bug or a model failure: 500 for this request only
        log.exception("%s failed", name)
        status, body = 500, {"error": f"internal error: {type(e).__name__}: {e}"}
      metrics.requests.labels(name, str(status)).inc()
      metrics.latency.labels(name).observe(time.perf_counter() - start)
      return JSONResponse(body, status_code=status, headers=headers)
    return route

  async def body_of(request: Request) -> dict:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
      raise RequestError(413, f"request body of {size} bytes exceeds {limits.max_body_bytes}")
    return parse_body(await request.body(), limits)

  async def healthz(request: Request) -> dict:
    return {"status": "ok", "model": model_name, "task": engine.task}

  async def classify(request: Request) -> dict:
    texts = parse_texts(await body_of(request), limits)
    probs_NC, _ = await batcher.submit(("classify", texts), rows=len(texts))
    labels = engine.clf.labels
    preds = []
    for p in probs_NC:
      k = int(np.argmax(p))
      preds.append({"label": labels[k], "score": float(p[k]),
                    "probs": {name: float(x) for name, x in zip(labels, p)}})
    return {"predictions": preds}

  async def answer(request: Request) -> dict:
    question = check_text((await body_of(request)).get("question"), "question", limits)
    probs_NC, matches = await batcher.submit(("answer", [question]), rows=1)
    k = int(np.argmax(probs_NC[0]))
    return engine.policy.decide(engine.clf.labels[k], float(probs_NC[0][k]), matches[0])

  async def generate(request: Request) -> dict:
    result = await batcher.submit(parse_generate(await body_of(request), limits))
    if isinstance(result, RequestError):
      raise result
    return result

  async def metrics_text(request: Request) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

  async def not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    return JSONResponse({"error": f"{request.method} {request.url.path}: "
                                  f"{getattr(exc, 'detail', 'not found')}"}, status_code=status)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    batcher.start()
    try:
      yield
    finally:  # uvicorn has finished the requests in flight: drain what is left and stop
      await asyncio.get_running_loop().run_in_executor(None, batcher.stop)
      log.info("stopped")

  routes = [Route("/healthz", endpoint("/healthz", None, healthz), methods=["GET"]),
            Route("/v1/classify", endpoint("/v1/classify", "cls", classify), methods=["POST"]),
            Route("/v1/answer", endpoint("/v1/answer", "cls", answer), methods=["POST"]),
            Route("/v1/generate", endpoint("/v1/generate", "lm", generate), methods=["POST"]),
            Route("/metrics", metrics_text, methods=["GET"])]
  app = Starlette(routes=routes, lifespan=lifespan,
                  exception_handlers={404: not_found, 405: not_found})
  app.state.batcher, app.state.metrics = batcher, metrics
  return app


TASK_NAMES = {"cls": "classifier", "lm": "language-model"}
TASK_ENDPOINTS = {"cls": "/v1/classify or /v1/answer", "lm": "/v1/generate"}


# ----------------------------------------------------------------- loading and the command


def model_stamp(engine: ClassifierEngine) -> str:
  """A fingerprint of the model's embeddings (of two fixed sentences, rounded to 1e-3): an
  index built by other weights, or another tokenizer, is rebuilt."""
  _, emb = engine.embed_rows(["where is my card?", "how do I reset my passcode"])
  return hashlib.sha256(np.round(emb * 1e3).astype(np.int32).tobytes()).hexdigest()[:16]


def thresholds(args, workdir: Path) -> tuple[float, float, str]:
  """(intent, retrieval, where they came from): flags, else WORKDIR/answer_thresholds.json,
  else the defaults."""
  saved = read_thresholds(workdir) or {}
  defaults = {"intent_threshold": DEFAULT_INTENT_THRESHOLD,
              "retrieval_threshold": DEFAULT_RETRIEVAL_THRESHOLD}
  chosen, where = [], []
  for name in defaults:
    flag = getattr(args, name)
    chosen.append(float(flag if flag is not None else saved.get(name, defaults[name])))
    where.append(f"{name.split('_')[0]}: " + ("flag" if flag is not None else
                 "answer_thresholds.json" if name in saved else "default"))
  return chosen[0], chosen[1], ", ".join(where)


def load_engine(args) -> ClassifierEngine | GeneratorEngine:
  """The engine for the workdir; every file is checked before the model is loaded."""
  from lmos_jax.workdir import label_names, read_config
  wd = Path(args.workdir)
  cfg = read_config(wd)
  if cfg.task != "cls":
    for flag in ("answers", "kb"):
      if getattr(args, flag) is not None:
        raise UserError(f"--{flag} applies to classifier workdirs; --workdir {wd} has task "
                        f"{cfg.task!r}")
    if cfg.model.arch != "gpt":
      raise UserError(f"--workdir {wd}: task {cfg.task!r} with model.arch {cfg.model.arch!r}; "
                      "lmos serve serves classifiers (task cls) and decoders (model.arch gpt)")
    from lmos_jax.inference.generate import load_trained
    from lmos_jax.models.decode import Decoder
    trained = load_trained(wd)
    return GeneratorEngine(trained, Decoder(trained.graphdef, trained.cfg.model.max_seq_len))
  templates = read_answers(args.answers, label_names(wd)) if args.answers else {}
  if args.kb is not None:
    read_kb(args.kb)  # a bad file fails here, before the model loads
  intent_t, retrieval_t, source = thresholds(args, wd)
  from lmos_jax.inference.predict import batch_widths, load_classifier
  clf = load_classifier(wd)
  engine = ClassifierEngine(clf, batch_widths(cfg), args.max_batch,
                            AnswerPolicy(templates, intent_t, retrieval_t), top_k=args.top_k)
  log.info("answers: %d templates, intent threshold %.3f, retrieval threshold %.3f (%s)",
           len(templates), intent_t, retrieval_t, source)
  if args.kb is not None:
    start = time.perf_counter()
    engine.index, rebuilt = load_or_build(wd, args.kb, model_stamp(engine),
                                          lambda qs: engine.embed_rows(qs)[1])
    log.info("retrieval index: %d entries %s in %.1f s", len(engine.index.entries),
             "built and saved" if rebuilt else "loaded", time.perf_counter() - start)
  return engine


def parse(argv: list[str]) -> argparse.Namespace:
  ap = ArgumentParser(prog=argv[0], description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True, type=existing_dir("config.json"),
                  help="workdir of a finetuned classifier or a trained decoder")
  ap.add_argument("--host", default="127.0.0.1")
  ap.add_argument("--port", type=number(int, 1, 65535), default=8000)
  ap.add_argument("--answers", default=None,
                  help="answer bank: JSONL of {\"intent\", \"answer\"} templates")
  ap.add_argument("--kb", default=None,
                  help="knowledge base for retrieval: JSONL or TSV of question, answer")
  ap.add_argument("--max-batch", type=number(int, 1, 4096), default=32,
                  help="texts per model batch (packed into one of a few fixed shapes)")
  ap.add_argument("--max-wait-ms", type=number(float, 0), default=5.0,
                  help="how long the first request of a batch may wait for more, while "
                       "fewer have come than the previous batch held")
  ap.add_argument("--queue", type=number(int, 1), default=256,
                  help="requests that may wait; more are answered 503")
  ap.add_argument("--top-k", type=number(int, 1, 100), default=3,
                  help="knowledge-base matches returned per question")
  ap.add_argument("--intent-threshold", type=number(float, 0, 1), default=None,
                  help="template answers need this intent probability (default: "
                       "WORKDIR/answer_thresholds.json, else 0.5)")
  ap.add_argument("--retrieval-threshold", type=number(float, -1, 1), default=None,
                  help="retrieved answers need this cosine score (default: "
                       "WORKDIR/answer_thresholds.json, else 0.5)")
  ap.add_argument("--max-texts", type=number(int, 1), default=Limits.max_texts,
                  help="texts per /v1/classify request")
  ap.add_argument("--log-level", default="info",
                  choices=["debug", "info", "warning", "error"])
  return ap.parse_args(argv[1:])


def setup_logging(level: str) -> None:
  """Our log lines and uvicorn's on stderr as `lmos serve: ...`; libraries' INFO chatter
  (the checkpoint reader's) stays off."""
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("lmos serve: %(message)s"))
  for name in ("lmos.serve", "uvicorn"):
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def uvicorn_fast_paths() -> tuple[str, str]:
  """What uvicorn's 'auto' settings will pick: httptools and uvloop (dependencies of lmos),
  or the slower pure-Python h11 and asyncio when they are missing from the install."""
  import importlib.util
  have = lambda name: importlib.util.find_spec(name) is not None  # noqa: E731
  return ("httptools" if have("httptools") else "h11 (pip install httptools: faster)",
          "uvloop" if have("uvloop") else "asyncio (pip install uvloop: faster)")


def main(argv: list[str]) -> int:
  import uvicorn
  args = parse(argv)
  setup_logging(args.log_level.upper())
  from lmos_jax.parallel.compile_cache import enable_compile_cache
  log.info(enable_compile_cache("auto"))  # a restart's warm-up reads its programs back
  engine = load_engine(args)
  start = time.perf_counter()
  engine.warmup()
  log.info("warm-up (every batch shape compiled) in %.1f s", time.perf_counter() - start)
  app = create_app(engine, model_name=Path(args.workdir).resolve().name,
                   max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1e3,
                   queue_size=args.queue, limits=Limits(max_texts=args.max_texts))
  log.info("HTTP parser %s, event loop %s", *uvicorn_fast_paths())
  config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                          access_log=False, timeout_graceful_shutdown=60,
                          log_config=None)
  # uvicorn drains on SIGTERM, then raises the signal again once its own handler is
  # restored: a no-op handler makes that second one end the run normally (exit 0)
  signal.signal(signal.SIGTERM, lambda signum, frame: None)
  try:
    uvicorn.Server(config).run()
  except KeyboardInterrupt:  # Ctrl-C: drained the same way, exits as interrupted
    return 130
  return 0
