"""Dynamic batching: requests that arrive together run through the model as one batch.

One worker thread owns the model (JAX dispatch and the compiled functions are not shared
between threads). Request handlers, on the asyncio event loop, put a `Job` on a bounded
queue and await its future; the worker takes the first waiting job, then every job already
queued, and waits for more (up to `max_wait_s` after that first job) only while the batch
has fewer jobs than the previous batch had: clients answered together come back together,
so a crowd is collected into one batch while a lone client is never kept waiting. It runs
the batch (at most `max_batch` rows) in one call of `run` and resolves each job's future on
its event loop. A full queue
refuses the job at once (`QueueFull`; the server answers 503 with Retry-After) instead of
letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable, Sequence

log = logging.getLogger("lmos.serve")


class QueueFull(Exception):
  """The job queue holds `queue_size` waiting jobs already."""


@dataclasses.dataclass
class Job:
  """One request's work: `payload` for `run`, `rows` of batch it takes, and the future its
  handler awaits."""

  payload: Any
  rows: int
  future: asyncio.Future
  loop: asyncio.AbstractEventLoop
  enqueued: float


@dataclasses.dataclass(frozen=True)
class BatchStats:
  """What one batch was: jobs, rows, the oldest job's wait in the queue and the run time."""

  jobs: int
  rows: int
  wait_s: float
  run_s: float


class Batcher:
  """A worker thread running `run(payloads) -> results` (one result per payload, in order)
  over batches of queued jobs. `on_batch(stats)` is called after every batch (metrics)."""

  def __init__(self, run: Callable[[list[Any]], Sequence[Any]], *, max_batch: int,
               max_wait_s: float, queue_size: int,
               on_batch: Callable[[BatchStats], None] = lambda s: None):
    self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
    self.on_batch = on_batch
    self.jobs: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
    self.expected = max_batch  # jobs worth waiting for: the previous batch's count
    self.stopping = threading.Event()
    self.thread = threading.Thread(target=self._loop, name="lmos-serve-worker", daemon=True)

  def start(self) -> None:
    self.thread.start()

  def stop(self, timeout_s: float = 60.0) -> None:
    """Finishes every queued job, then ends the worker thread."""
    self.stopping.set()
    self.thread.join(timeout_s)

  def submit(self, payload: Any, rows: int = 1) -> asyncio.Future:
    """Queues a job from the running event loop; its future resolves to `run`'s result."""
    if self.stopping.is_set():
      raise QueueFull("the server is shutting down")
    loop = asyncio.get_running_loop()
    job = Job(payload, rows, loop.create_future(), loop, time.perf_counter())
    try:
      self.jobs.put_nowait(job)
    except queue.Full:
      raise QueueFull(f"{self.jobs.maxsize} requests are waiting already") from None
    return job.future

  def _take_batch(self) -> list[Job]:
    """The first waiting job (waits up to 0.1 s, so a stop is noticed), then the queued ones,
    then, while fewer than `expected`, more until the first job has waited max_wait_s; never
    more than max_batch rows."""
    try:
      first = self.jobs.get(timeout=0.1)
    except queue.Empty:
      return []
    batch, rows = [first], first.rows
    deadline = first.enqueued + self.max_wait_s
    while rows < self.max_batch:
      left = deadline - time.perf_counter() if len(batch) < self.expected else 0.0
      try:
        job = self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait()
      except queue.Empty:
        break
      batch.append(job)
      rows += job.rows
    self.expected = len(batch)
    return batch

  def _loop(self) -> None:
    while not (self.stopping.is_set() and self.jobs.empty()):
      batch = self._take_batch()
      if batch:
        self._run(batch)

  def _run(self, batch: list[Job]) -> None:
    start = time.perf_counter()
    try:
      results = list(self.run([j.payload for j in batch]))
      if len(results) != len(batch):
        raise RuntimeError(f"run returned {len(results)} results for {len(batch)} jobs")
      outcome = [(True, r) for r in results]
    except Exception as e:  # a model error fails this batch's requests, not the server
      log.exception("batch of %d requests failed", len(batch))
      outcome = [(False, e)] * len(batch)
    done = time.perf_counter()
    stats = BatchStats(len(batch), sum(j.rows for j in batch), start - batch[0].enqueued,
                       done - start)
    for job, (ok, value) in zip(batch, outcome):
      try:
        job.loop.call_soon_threadsafe(_resolve, job.future, ok, value)
      except RuntimeError:  # its event loop is closed: nobody waits for the answer
        pass
    log.info("batch: %d requests, %d rows, waited %.1f ms, ran %.1f ms", stats.jobs,
             stats.rows, 1e3 * stats.wait_s, 1e3 * stats.run_s)
    self.on_batch(stats)


def _resolve(future: asyncio.Future, ok: bool, value: Any) -> None:
  if future.done():  # the client went away and its handler was cancelled
    return
  if ok:
    future.set_result(value)
  else:
    future.set_exception(value)
