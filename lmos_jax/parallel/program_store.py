"""Traced programs kept beside the compilation cache: a repeated run skips tracing too.

JAX's persistent cache (compile_cache.py) spares a second run XLA's compile, but every process
still traces its jitted programs in Python and lowers them to StableHLO before the cache can be
asked: for the shakespeare cpu config's train call about 0.5 s of a 2.5 s warm start-up on a
2-core host, the largest part left after the imports. `jax.export` serializes a lowered
program; a later process reads it back in milliseconds and lowers only the call into it.

A program is stored under a key of everything its trace reads: its name and whatever the caller
adds (the run's config, the resolved precision policy, the vocabulary size), the arguments'
shapes, dtypes, shardings and pytree structure, the mesh's devices, the sha256 of lmos_jax's
own source files, the versions of Python and of the libraries on the trace path, JAX's flag
values and XLA_FLAGS. A change to any of them traces and stores the program afresh.

A first run stores the program and then calls it the way a repeated run does, so both compile
the same module and the second finds it in the persistent cache. The stored module computes
what the jitted function computes, bit for bit (tests/test_program_store.py): the call into it
is inlined before XLA optimises. Arguments of other shapes than the stored ones (length
buckets) go to the jitted function. Only single-process runs use the store.

The files are pickles (the pytree structures) read only from this cache directory, the same
trust as the executables JAX keeps there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Callable

import jax
from jax import export

SUBDIR = "lmos_programs"
# libraries whose code runs while lmos's programs are traced
TRACE_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "chex", "numpy", "ml_dtypes",
                   "ml_collections")


def source_digest(package_dir: Path) -> str:
  """sha256 over lmos_jax's source files (path and bytes): any edit is another program."""
  h = hashlib.sha256()
  for path in sorted(package_dir.rglob("*")):
    if path.suffix in (".py", ".cc") and path.is_file():
      h.update(str(path.relative_to(package_dir)).encode() + b"\0" + path.read_bytes())
  return h.hexdigest()


def library_versions() -> dict[str, str]:
  out = {"python": sys.version}
  for name in TRACE_LIBRARIES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "absent"
  return out


def environment_key() -> dict[str, Any]:
  """What every program's trace shares in this process: code, versions, flags."""
  import lmos_jax
  return {"source": source_digest(Path(lmos_jax.__file__).parent),
          "versions": library_versions(),
          "jax_flags": sorted((k, repr(v)) for k, v in jax.config.values.items()),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def program_key(name: str, specs: tuple, mesh: jax.sharding.Mesh, parts: dict,
                environment: dict) -> str:
  """The file name a program traced for `specs` on `mesh` is stored under."""
  leaves, tree = jax.tree.flatten(specs)
  doc = {"name": name, "parts": parts, "environment": environment, "tree": str(tree),
         "args": [[list(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)),
                   str(getattr(x, "sharding", None))] for x in leaves],
         "mesh": [list(mesh.axis_names), list(mesh.devices.shape),
                  [[d.id, d.platform, d.device_kind] for d in mesh.devices.flat]]}
  blob = json.dumps(doc, sort_keys=True, default=str).encode()
  return f"{name}-{hashlib.sha256(blob).hexdigest()[:40]}"


@dataclasses.dataclass
class ProgramStore:
  """Where traced programs go (None: not stored), and what was done with them this run."""

  directory: Path | None
  parts: dict  # the caller's key parts (config, policy...), shared by its programs
  read: list[str] = dataclasses.field(default_factory=list)
  stored: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)  # "name: why"
  _environment: dict | None = None

  def environment(self) -> dict:
    if self._environment is None:
      self._environment = environment_key()
    return self._environment

  def jit(self, name: str, jitted: Callable, specs: tuple, mesh: jax.sharding.Mesh,
          donate_argnums: tuple[int, ...] = ()) -> Callable:
    """`jitted` (a jax.jit function), called through its stored program for `specs`.

    The returned function is jitted with `specs`' shardings and `donate_argnums`; calls with
    other shapes run `jitted` inside it. Without a directory, `jitted` itself."""
    if self.directory is None:
      return jitted
    path = self.directory / f"{program_key(name, specs, mesh, self.parts, self.environment())}.pkl"
    exp = read_program(path)
    if exp is not None:
      self.read.append(name)
    else:
      try:
        with jax.set_mesh(mesh):
          exp = export.export(jitted)(*specs)
        write_program(path, exp)
      except Exception as e:  # a construct jax.export cannot store: trace every run instead
        self.skipped.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        return jitted
      self.stored.append(name)
    return call_stored(exp, jitted, specs, donate_argnums)

  def summary(self) -> str:
    """'2 traced programs read back' and the like, for the run's first-step line."""
    said = [f"{len(v)} traced program(s) {what}" for what, v in
            (("read back", self.read), ("stored", self.stored)) if v]
    said += [f"not stored ({s})" for s in self.skipped]
    return "; ".join(said)


def call_stored(exp: export.Exported, jitted: Callable, specs: tuple,
                donate_argnums: tuple[int, ...]) -> Callable:
  """A jit function that runs the stored program for arguments shaped like `specs`."""
  want = [(tuple(x.shape), x.dtype) for x in exp.in_avals]

  def call(*args):
    leaves = jax.tree.leaves(args)
    if [(tuple(x.shape), x.dtype) for x in leaves] != want:
      return jitted(*args)
    return exp.call(*args)

  in_shardings = jax.tree.map(lambda x: x.sharding, specs)
  return jax.jit(call, in_shardings=in_shardings, donate_argnums=donate_argnums)


def write_program(path: Path, exp: export.Exported) -> None:
  """The serialized module with its pytree structures, written whole or not at all.

  jax.export serializes trees whose dicts have string keys only; a model's layer lists have
  integer keys, so the module is stored with flat argument and result lists and the real
  structures are pickled beside it."""
  flat = dataclasses.replace(
      exp, in_tree=jax.tree.structure((tuple(range(len(exp.in_avals))), {})),
      out_tree=jax.tree.structure(list(range(len(exp.out_avals)))))
  blob = pickle.dumps({"module": bytes(flat.serialize()), "in_tree": exp.in_tree,
                       "out_tree": exp.out_tree})
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".tmp{os.getpid()}")
  tmp.write_bytes(blob)
  os.replace(tmp, path)


def read_program(path: Path) -> export.Exported | None:
  """The stored program, or None when there is none or it does not read back (then it is
  traced again and overwritten)."""
  try:
    saved = pickle.loads(path.read_bytes())
    exp = export.deserialize(bytearray(saved["module"]))
    return dataclasses.replace(exp, in_tree=saved["in_tree"], out_tree=saved["out_tree"])
  except Exception:  # missing, truncated, or from an incompatible jax: trace afresh
    return None
