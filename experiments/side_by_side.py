"""What the side-by-side benchmarks share: each contender runs as its own process (launched
alternately), so a benchmark needs the `lmos` command, a wall-clock timer around a child
process, a readable failure, and a description of the machine the figures came from.

Imported by experiments/bench_*.py, which run as scripts (this folder is on their path).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lmos_command() -> list[str]:
  """The `lmos` console script of this Python (not a version-manager shim), else -m."""
  here = Path(sys.executable).parent / "lmos"
  if here.is_file():
    return [str(here)]
  found = shutil.which("lmos")
  return [found] if found else [sys.executable, "-m", "lmos_jax.cli"]


def timed(cmd: list[str], log: Path) -> tuple[float, int]:
  """Wall seconds of one subprocess from launch to exit (run from the repository root), its
  output to `log`."""
  with open(log, "w") as f:
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    return time.perf_counter() - t0, rc


def fail(bench: str, what: str, log: Path, rc: int) -> int:
  """Shows the end of a failed child's log and says where the rest is; exit status 1."""
  text = log.read_text(errors="replace").splitlines()
  print("\n".join(text[-30:]), file=sys.stderr)
  print(f"{bench}: {what} failed (exit {rc}); its output is in {log}", file=sys.stderr)
  return 1


def machine() -> dict:
  """CPU model, core counts, platform and the versions the figures depend on."""
  from lmos_jax.parallel.host_cpu import cpu_model
  versions = {}
  for pkg in ("torch", "transformers", "jax", "jaxlib", "flax"):
    try:
      versions[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      versions[pkg] = "absent"
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  cpu = cpu_model() or platform.processor() or "unknown"  # no /proc/cpuinfo: macOS, Windows
  return {"cpu_count": os.cpu_count(), "cores_available": cores, "cpu": cpu,
          "platform": platform.platform(), "python": platform.python_version(), **versions}
