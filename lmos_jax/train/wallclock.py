"""Where a run's wall time goes: start-up, the first step (compile), steps, eval, checkpoint,
sample and finish, as parts that add up to the whole.

Steady-state tokens/s says how fast a step is; a short run's wall time is often dominated by
everything else (imports, compiles, evals, checkpoint writes, the final sample). The clock
is always in exactly one part: `switch` moves it on, and `measure` lends the time of a block
to another part and then returns, so the parts partition the run with nothing counted twice.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

PARTS = ("startup", "first_step", "steps", "eval", "checkpoint", "sample", "finish")
LABELS = {"startup": "start-up", "first_step": "first step (compile)"}


def process_age() -> float:
  """Seconds since this process started (Linux: /proc), so that a command's start-up counts
  the interpreter and its imports too; 0.0 where /proc cannot say."""
  import os
  from pathlib import Path
  try:
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    start_s = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start, ticks after boot
    uptime_s = float(Path("/proc/uptime").read_text().split()[0])
  except (OSError, ValueError, IndexError):
    return 0.0
  return max(uptime_s - start_s, 0.0)


class WallClock:
  """Accumulates perf_counter seconds into PARTS; starts in `startup` when created, or
  `already` seconds before (the time a process spent before it made the clock)."""

  def __init__(self, already: float = 0.0) -> None:
    self.seconds = dict.fromkeys(PARTS, 0.0)
    self.part = "startup"
    self.since = time.perf_counter() - already
    self.started = self.since

  def switch(self, part: str) -> None:
    """From now on, time counts for `part`."""
    now = time.perf_counter()
    self.seconds[self.part] += now - self.since
    self.part, self.since = part, now

  @contextlib.contextmanager
  def measure(self, part: str) -> Iterator[None]:
    """The block's time counts for `part`; afterwards the clock returns to where it was."""
    back = self.part
    self.switch(part)
    try:
      yield
    finally:
      self.switch(back)

  def elapsed(self) -> float:
    return time.perf_counter() - self.started

  def breakdown(self) -> dict[str, float]:
    """Seconds per part up to now (the current part included), and their sum `wall`."""
    out = dict(self.seconds)
    out[self.part] += time.perf_counter() - self.since
    out["wall"] = sum(out[p] for p in PARTS)
    return out


def describe(breakdown: dict[str, float]) -> str:
  """One log line: 'wall 12.3 s = start-up 3.1 + first step (compile) 4.0 + ...'."""
  parts = " + ".join(f"{LABELS.get(p, p)} {breakdown[p]:.1f}" for p in PARTS)
  return f"wall {breakdown['wall']:.1f} s = {parts}"
