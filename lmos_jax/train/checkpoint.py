"""Orbax checkpoints that survive kills: train state (sharded arrays) + JSON metadata.

One checkpoint step holds the whole train state (params, optimizer state, step, RNG) and a
JSON record (config, step, tokens seen, wall time, versions, data-iterator state, and a
content fingerprint of every array). Why each piece:

- Saves are asynchronous; orbax writes to `STEP.orbax-checkpoint-tmp` and renames it when
  complete, so a half-written step is never listed, and old steps are deleted only after the
  new one is finalized (orbax `_finalize`).
- The fingerprint (a wrapping uint32 hash per array, computed on device) catches corruption
  that tensorstore would read back silently; unreadable or mismatching steps are moved aside
  to `WORKDIR/checkpoints_corrupt/` and the run resumes from the newest good one.
- Restore takes abstract arrays carrying the *current* shardings, so a checkpoint saved on
  one mesh restores onto any other (or one device).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from lmos_jax.errors import UserError
from lmos_jax.workdir import (CORRUPT_DIR, META_ITEM, STATE_ITEM, CheckpointError,
                              checkpoint_dir, fingerprint, fingerprint_mismatch, has_entries,
                              step_dir, without_absl_warnings)


class CheckpointReadError(CheckpointError, UserError):
  """A checkpoint the user pointed at cannot be used (no such step, corrupt, truncated):
  bad input, so `lmos` reports it as one line and exits 2."""


class NonFiniteError(RuntimeError):
  """Training produced non-finite losses or gradients for too many steps in a row."""


def state_nbytes(abstract_state: Any) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(abstract_state)))


# ---------------------------------------------------------------- workdir checks


def check_writable(directory: Path, needed_bytes: int = 0) -> None:
  """Fails at start, naming the directory, if a checkpoint cannot be written there."""
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write_probe_{os.getpid()}"
    probe.write_bytes(b"ok")
    probe.unlink()
  except OSError as e:
    raise CheckpointError(f"cannot write checkpoints to {directory}: {e.strerror or e}; "
                          "pass a writable --workdir (or fix its permissions)") from None
  free = shutil.disk_usage(directory).free
  if needed_bytes and free < needed_bytes:
    raise CheckpointError(f"{directory} has {free / 2**20:.1f} MiB free but one checkpoint "
                          f"needs about {needed_bytes / 2**20:.1f} MiB; free space or pass "
                          "another --workdir")


def drop_metric_rows_after(path: Path, step: int) -> int:
  """Removes metrics.jsonl rows logged after `step` (they are recomputed on resume).

  Written to a temporary file and renamed, so a kill here leaves the old file whole.
  Returns the number of rows dropped.
  """
  if not path.exists():
    return 0
  keep, dropped = [], 0
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    try:
      row_step = int(json.loads(line)["step"])
    except (ValueError, KeyError):  # a line cut by a kill mid-write
      dropped += 1
      continue
    if row_step <= step:
      keep.append(line)
    else:
      dropped += 1
  if dropped:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
  return dropped


# ---------------------------------------------------------------- the manager


def preservation_policy(keep_last: int, keep_best: int, best_metric: str, best_mode: str):
  """Keep the newest `keep_last` steps plus the `keep_best` best by an eval metric."""
  import orbax.checkpoint as ocp
  cm = ocp.checkpoint_managers
  latest = cm.LatestN(n=keep_last)
  if keep_best <= 0:
    return latest
  best = cm.BestN(get_metric_fn=lambda m: float(m[best_metric]), reverse=best_mode == "min",
                  n=keep_best, keep_checkpoints_without_metrics=False)
  return cm.AnyPreservationPolicy([latest, best])


class Checkpointer:
  """`ocp.CheckpointManager` with the run's layout under WORKDIR/checkpoints."""

  def __init__(self, workdir: Path, keep: int = 3, async_save: bool = True, keep_best: int = 0,
               best_metric: str = "eval_loss", best_mode: str = "min",
               read_only: bool = False):
    self.workdir = Path(workdir).absolute()
    self.directory = checkpoint_dir(self.workdir)
    self._options = dict(keep=keep, async_save=async_save, keep_best=keep_best,
                         best_metric=best_metric, best_mode=best_mode, read_only=read_only)

  @functools.cached_property
  def manager(self):
    """The orbax manager, opened at the first save or read: a fresh run's start-up does not
    wait for orbax's import (~0.15 s on a 2-core host)."""
    import orbax.checkpoint as ocp
    o = self._options
    # read_only: orbax logs a warning per option it turns off and one that the directory is
    # read only; they restate what was asked for and would sit beside every lmos message
    with without_absl_warnings("CheckpointManagerOptions.read_only=True",
                               "Given directory is read only"):
      options = ocp.CheckpointManagerOptions(
          create=not o["read_only"], read_only=o["read_only"],
          enable_async_checkpointing=o["async_save"],
          cleanup_tmp_directories=not o["read_only"],  # half-written steps from a killed run
          preservation_policy=preservation_policy(o["keep"], o["keep_best"], o["best_metric"],
                                                  o["best_mode"]))
      try:
        return ocp.CheckpointManager(self.directory, options=options)
      except OSError as e:
        raise CheckpointError(f"cannot open checkpoints in {self.directory}: {e}") from None

  def opened(self) -> bool:
    return "manager" in self.__dict__

  def step_dir(self, step: int) -> Path:
    return step_dir(self.workdir, step)

  def all_steps(self) -> list[int]:
    if not self.opened() and not has_entries(self.directory):
      return []  # nothing saved yet: no need to open orbax for that
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None,
           force: bool = False) -> bool:
    """Starts an async save (returns at once); a failure of an earlier save surfaces here."""
    import orbax.checkpoint as ocp
    meta = {**meta, "fingerprint": fingerprint(state)}
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                 META_ITEM: ocp.args.JsonSave(meta)})
    try:
      return self.manager.save(int(step), args=args, metrics=metrics, force=force)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and what is still safe
      raise self._save_error(step, e) from e

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(None, e) from e

  def _save_error(self, step: int | None, e: Exception) -> CheckpointError:
    where = self.step_dir(step) if step is not None else self.directory
    kept = self.all_steps()
    return CheckpointError(
        f"saving a checkpoint under {where} failed ({type(e).__name__}: {e}); the complete "
        f"checkpoints already saved (steps {kept or 'none'}) are untouched. Check free space "
        "and permissions of the workdir, then rerun the same command to resume.")

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    import orbax.checkpoint as ocp
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                                 META_ITEM: ocp.args.JsonRestore()})
    out = self.manager.restore(int(step), args=args)
    return out[STATE_ITEM], out[META_ITEM]

  def restore_meta(self, step: int) -> dict:
    import orbax.checkpoint as ocp
    out = self.manager.restore(int(step),
                               args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
    return out[META_ITEM]

  def restore_verified(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores one step and checks every array against the saved fingerprint."""
    state, meta = self.restore(step, abstract_state)
    expected = meta.get("fingerprint")
    if expected is not None:
      bad = fingerprint_mismatch(expected, state)
      if bad:
        raise CheckpointError(f"content of {len(bad)} array(s) differs from what was saved: "
                              f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    return state, meta

  def quarantine(self, step: int) -> Path:
    """Moves a bad step out of the manager's sight (never deletes it) and rescans."""
    dest_root = self.workdir / CORRUPT_DIR
    dest = dest_root / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
    if jax.process_index() == 0:
      dest_root.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.step_dir(step)), dest)
    if jax.process_count() > 1:  # every host rescans only after the move
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"lmos_quarantine_{step}")
    self.manager.reload()
    return dest

  def close(self) -> None:
    if self.opened():
      self.wait()
      self.manager.close()


@contextlib.contextmanager
def abandoned_reads_quiet():
  """While a restore may fail: drops the "Event loop is closed" errors of the reads it
  abandoned, and nothing else.

  Why: orbax runs a restore in a fresh asyncio loop and closes that loop as soon as one read
  fails; tensorstore still completes the step's other reads, and each of their callbacks
  hits the closed loop and prints an unraisable RuntimeError traceback (dozens per bad
  step), burying the one line that names the bad checkpoint. Every other unraisable error
  still reaches the previous hook.
  """
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    sys.unraisablehook = previous


def restore_latest_good(ckpt: Checkpointer, abstract_state: Any,
                        check_meta: Callable[[int, dict], None] = lambda step, meta: None,
                        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr,
                                                                    flush=True)
                        ) -> tuple[int | None, Any, dict]:
  """(step, state, meta) of the newest checkpoint that reads back intact, or (None, None, {}).

  `check_meta` may raise to refuse an incompatible checkpoint (that error propagates: it is
  a user error, not corruption). Newer unreadable steps are moved aside only once an older
  good one has been restored; if none is good nothing moves and a CheckpointError names them.
  """
  with abandoned_reads_quiet():
    return _restore_latest_good(ckpt, abstract_state, check_meta, log)


def _restore_latest_good(ckpt: Checkpointer, abstract_state: Any,
                         check_meta: Callable[[int, dict], None],
                         log: Callable[[str], None]) -> tuple[int | None, Any, dict]:
  bad: list[tuple[int, str]] = []
  for step in reversed(ckpt.all_steps()):
    try:
      meta = ckpt.restore_meta(step)
    except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable
      bad.append((step, f"{type(e).__name__}: {e}"))
      log(f"lmos: checkpoint {ckpt.step_dir(step)} is unreadable ({bad[-1][1][:300]})")
      continue
    check_meta(step, meta)
    try:
      state, meta = ckpt.restore_verified(step, abstract_state)
    except Exception as e:  # noqa: BLE001
      bad.append((step, f"{type(e).__name__}: {e}"))
      log(f"lmos: checkpoint {ckpt.step_dir(step)} is corrupt or truncated "
          f"({bad[-1][1][:300]})")
      continue
    for bad_step, _ in bad:
      dest = ckpt.quarantine(bad_step)
      log(f"lmos: moved bad checkpoint step {bad_step} to {dest}; falling back to step {step}")
    return step, state, meta
  if bad:
    names = ", ".join(str(ckpt.step_dir(s)) for s, _ in bad)
    raise CheckpointError(f"no readable checkpoint in {ckpt.directory}: {names} all failed "
                          f"(first error: {bad[0][1][:500]}); move them away to start fresh")
  return None, None, {}


# ---------------------------------------------------------------- stopping cleanly


class PreemptionGuard:
  """Turns SIGTERM/SIGINT into a flag the loop polls between steps (save, wait, exit 0).

  With several processes the signal reaches hosts at different steps, so they agree through
  jax's preemption sync manager (`CheckpointManager.reached_preemption`, which JAX arms on
  `jax.distributed.initialize`) instead of a local flag.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: str | None = None
    self._previous: dict = {}

  def _handle(self, signum, frame) -> None:
    if self.received is not None:  # a second signal: the user insists
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name
    print(f"\nlmos train: got {self.received}; finishing this step, then saving "
          "(send it again to abort without saving)", file=sys.stderr, flush=True)

  def __enter__(self) -> "PreemptionGuard":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous = {}

  def should_stop(self, step: int, ckpt: Checkpointer, steps: int = 1) -> bool:
    """After a call that ran `steps` steps up to `step`: save and stop now?"""
    if jax.process_count() > 1:  # every process asks about the same steps in the same order
      if any(ckpt.manager.reached_preemption(s) for s in range(step - steps + 1, step + 1)):
        self.received = self.received or "preemption notice"
        return True
      return False
    return self.received is not None


class NonFiniteMonitor:
  """Counts steps whose update the jitted step skipped (non-finite loss or gradients).

  policy 'skip' keeps going but stops after `max_bad` consecutive bad steps; 'stop' stops at
  the first. The loop checks `exhausted` before saving, so the last good checkpoint stays the
  newest, then raises `error(step)`.
  """

  def __init__(self, policy: str, max_bad: int, total: int = 0):
    self.policy, self.max_bad = policy, max_bad
    self.consecutive, self.total = 0, total
    self.last_step = 0  # the newest step counted (the loop fetches steps in batches)

  def update(self, step: int, bad: bool) -> None:
    """Counts and logs one step's outcome."""
    self.last_step = step
    if not bad:
      self.consecutive = 0
      return
    self.consecutive += 1
    self.total += 1
    print(f"lmos train: step {step}: non-finite loss or gradient, update skipped "
          f"({self.consecutive} in a row, {self.total} in total)", file=sys.stderr, flush=True)

  @property
  def exhausted(self) -> bool:
    """True once the run must stop: `max_bad` bad steps in a row (or one, with 'stop')."""
    return self.consecutive >= (1 if self.policy == "stop" else self.max_bad)

  def error(self, step: int) -> NonFiniteError:
    return NonFiniteError(
        f"stopped at step {step}: {self.consecutive} consecutive step(s) with a non-finite "
        f"loss or gradient (train.nonfinite={self.policy!r}, train.max_bad_steps="
        f"{self.max_bad}); no checkpoint was written after them, the last good one is intact. "
        "Lower train.lr, check the data, or raise train.max_bad_steps.")
