"""The trainer's view of a data object: batches prefetched in the background, the time spent
waiting for them, and the stream state that goes into (and is checked on) a checkpoint.

Works for any data object with `train_batch(step)`; `state(step)`/`restore(state, step)` are
used when the object has them, so other tasks' data objects plug in unchanged.
"""

from __future__ import annotations

import collections
import inspect
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np

from lmos_jax.data.errors import DataError


class BatchStream:
  """Batches start..end-1 made ahead in one background thread, `depth` in flight, in step
  order.

  The thread is a `concurrent.futures` pool of one: a batch is a deterministic function of
  its step, so prefetching needs nothing more (the README's Stack section says why no data
  loading library). An error making a batch is raised by the `next()` that asks for it.
  `wait_seconds` accumulates the time `next()` blocked: the numerator of the trainer's
  `data_wait_frac` (input-wait time / step time).
  """

  def __init__(self, batch_fn: Callable[[int], dict], start: int, end: int, depth: int = 4):
    self._fn, self._steps = batch_fn, iter(range(start, end))
    self._pool = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmos-batches")
                  if depth > 0 else None)
    self._ahead: collections.deque[Future] = collections.deque()
    for _ in range(depth):
      self._submit()
    self.wait_seconds = 0.0

  def _submit(self) -> None:
    step = next(self._steps, None)
    if step is not None:
      self._ahead.append(self._pool.submit(self._fn, step))

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    t0 = time.perf_counter()
    try:
      if self._pool is None:
        return self._fn(next(self._steps))
      if not self._ahead:
        self._pool.shutdown(wait=False)
        raise StopIteration
      batch = self._ahead.popleft()
      self._submit()
      return batch.result()
    finally:
      self.wait_seconds += time.perf_counter() - t0


def batch_stream(data: Any, start: int, end: int, depth: int) -> BatchStream:
  return BatchStream(data.train_batch, start, end, depth)


def data_state(data: Any, step: int) -> dict:
  """JSON-able stream state after `step` steps ({} for data objects without one)."""
  fn = getattr(data, "state", None)
  if fn is None:
    return {}
  return fn(step) if inspect.signature(fn).parameters else fn()


def restore_data_state(data: Any, saved: dict | None, step: int) -> None:
  """Checks a checkpoint's data state against the rebuilt stream (raises on mismatch)."""
  if saved and hasattr(data, "restore"):
    data.restore(saved, step)


def check_state(mine: dict, saved: dict) -> None:
  """A checkpoint's data state must match the stream rebuilt now, or the resume is not exact."""
  if not saved:
    return
  for key in ("kind", "seed", "fingerprint", "rows_consumed", "rows_per_epoch", "sort_window"):
    if key in saved and saved[key] != mine.get(key):
      raise DataError(f"the checkpoint's data state differs from this run's ({key}: saved "
                      f"{saved[key]!r}, now {mine.get(key)!r}): the data, tokenizer, seed or "
                      "batching changed; resume with the original data settings or use a "
                      "fresh --workdir")
