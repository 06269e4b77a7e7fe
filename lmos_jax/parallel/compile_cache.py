"""JAX's persistent compilation cache, on by default: a second run of a config compiles nothing.

XLA compiles every jitted program at its first call; for the train step of a mid-sized model
that is tens of seconds per start, paid again on every resume and every sweep point. JAX can
keep compiled executables on disk, keyed by the program, its shardings, the backend and the
XLA flags, so a changed model or flag compiles afresh and a repeated one is read back.

Where the cache lives, in order:
  `train.compile_cache` = a directory: there;  = "off": no cache;
  = "auto" (default): `$LMOS_COMPILE_CACHE` if set ("off" disables), else the per-user
  `$XDG_CACHE_HOME/lmos_jax/jax` (`~/.cache/lmos_jax/jax`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

ENV = "LMOS_COMPILE_CACHE"
OFF = "off"


def user_cache_root(environ: Mapping[str, str]) -> Path:
  """lmos's per-user cache folder: `$XDG_CACHE_HOME/lmos_jax` (`~/.cache/lmos_jax`)."""
  base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", "~")) / ".cache")
  return Path(base).expanduser() / "lmos_jax"


def cache_dir(setting: str, environ: Mapping[str, str]) -> tuple[Path | None, str]:
  """(directory or None, where the choice came from), for config value `setting`."""
  if setting == OFF:
    return None, "train.compile_cache=off"
  if setting != "auto":
    return Path(setting).expanduser(), "train.compile_cache"
  env = environ.get(ENV, "").strip()
  if env:
    return (None, f"{ENV}=off") if env == OFF else (Path(env).expanduser(), ENV)
  return user_cache_root(environ) / "jax", "per-user default"


def enable_compile_cache(setting: str, environ: Mapping[str, str] | None = None) -> str:
  """Points JAX's persistent cache at the chosen directory (or turns it off) and returns a
  one-line description for the run's log.

  Every program is cached, however fast it compiled: JAX's default (only programs over one
  second) would leave a restart compiling the many small ones (eval, init, sampling).
  """
  path, why = cache_dir(setting, os.environ if environ is None else environ)
  line = f"compile cache {path} ({why})" if path else f"compile cache off ({why})"
  try:
    if path:
      path.mkdir(parents=True, exist_ok=True)
  except OSError as e:  # a read-only home must not stop training: say so and compile
    path, line = None, (f"compile cache off: cannot create {path} ({e.strerror}); set {ENV}"
                        " to move it")
  jax.config.update("jax_enable_compilation_cache", path is not None)
  jax.config.update("jax_compilation_cache_dir", None if path is None else str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()  # JAX decides once per process: make it decide again
  return line


class CompileAhead:
  """A jitted function lowered now and compiled in a background thread.

  Lowering (tracing, MLIR) is Python and stays on the caller's thread; XLA's compile, or its
  read back from the persistent cache, runs in C++ without the GIL, so it overlaps whatever
  the caller does next (initialising or restoring the state, opening writers). A call of the
  same jitted function with arguments of the lowered shapes and shardings then finds the
  executable in jit's own caches. `wait()` before that call: a call made while the thread
  still compiles would compile a second copy.
  """

  def __init__(self, jitted, specs: tuple, mesh):
    with jax.set_mesh(mesh):
      lowered = jitted.lower(*specs)
    self._error: BaseException | None = None
    # daemon: a run that stops during set-up (a config error) exits without waiting for it
    self._thread = threading.Thread(target=self._compile, args=(lowered,), daemon=True,
                                    name="lmos-compile-ahead")
    self._thread.start()

  def _compile(self, lowered) -> None:
    try:
      self._compiled = lowered.compile()
    except BaseException as e:  # raised in the caller's thread by wait()
      self._error = e

  def wait(self) -> None:
    self._thread.join()
    if self._error is not None:
      raise self._error

  def compiled(self):
    """The compiled program (after waiting for it): callable with the lowered arguments."""
    self.wait()
    return self._compiled
