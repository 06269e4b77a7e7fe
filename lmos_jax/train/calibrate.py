"""What this machine's devices really do, measured by short probes and kept per machine, so
`lmos plan` predicts step times from measurements instead of assumed constants.

A spec sheet says what a chip can do at best; a small model's matmuls, simulated CPU devices
that share a few cores, or a slow interconnect run far below it. Each number here is a probe
run on the present devices, every device busy at once (so devices that share cores share
them in the probe too):

- `matmul_rate(m, k, n)`: FLOP/s per device of an (m, k) x (k, n) matmul, probed at the shape
  asked (the planner asks for each layout's per-device MLP shape);
- `allreduce_bw`: bytes/s of an all-reduce across the devices (ring bus bandwidth);
- `op_s`: seconds of one small dependent op (the floor under each kernel or thunk);
- `dispatch_s`: seconds of one program call with nothing to compute.

The probes take seconds; their results are kept in `lmos_calibration.json` in the compile
cache's directory, keyed like the host peak (CPU model, cores, devices, jax, XLA flags), so a
second plan on the same machine reads them back and another machine measures afresh.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lmos_jax.train.metrics import host_key, read_machine_file, write_machine_entry

CALIBRATION_FILE = "lmos_calibration.json"
ALLREDUCE_BYTES = 16 * 2 ** 20  # per device: large enough that bandwidth, not latency, shows
OP_CHAIN = 200  # dependent small ops timed together for op_s


def _median_seconds(fn: Callable[..., Any], *args: Any, min_calls: int = 5,
                    min_seconds: float = 0.3, max_calls: int = 500) -> float:
  """Median wall seconds of `fn(*args)` after one warm-up call (which compiles), over at
  least `min_calls` calls and `min_seconds`: a millisecond probe needs hundreds of calls
  before a moment of contention stops moving its median."""
  jax.block_until_ready(fn(*args))
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < max_calls and (len(times) < min_calls
                                    or time.perf_counter() - start < min_seconds):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _per_device(devices: Sequence[Any], shape: tuple[int, ...], dtype) -> jax.Array:
  """Ones of `shape` on every device at once: a leading device axis split over a 1-D mesh."""
  mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
  return jax.device_put(jnp.ones((len(devices), *shape), dtype),
                        NamedSharding(mesh, PartitionSpec("d")))


def probe_matmul(devices: Sequence[Any], m: int, k: int, n: int, dtype=jnp.float32) -> float:
  """FLOP/s per device of an (m, k) x (k, n) matmul run on every device at once."""
  a = _per_device(devices, (m, k), dtype)
  b = _per_device(devices, (k, n), dtype)
  f = jax.jit(lambda a, b: jnp.einsum("dmk,dkn->dmn", a, b))
  return 2.0 * m * k * n / _median_seconds(f, a, b)


def probe_allreduce(devices: Sequence[Any], nbytes: int = ALLREDUCE_BYTES) -> float:
  """Ring bus bandwidth (bytes/s) of a sum over the devices of `nbytes` per device:
  2 (n-1)/n x bytes moved per device, over the time (inf for one device: nothing moves)."""
  n = len(devices)
  if n == 1:
    return float("inf")
  mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
  x = _per_device(devices, (nbytes // 4,), jnp.float32)
  f = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "d"), mesh=mesh,
                            in_specs=PartitionSpec("d"), out_specs=PartitionSpec("d")))
  return 2.0 * (n - 1) / n * nbytes / _median_seconds(f, x)


def probe_op(devices: Sequence[Any]) -> float:
  """Seconds per small op: a chain of dependent 8x8 matmuls and tanh XLA cannot merge."""
  def chain(x):
    for _ in range(OP_CHAIN // 2):
      x = jnp.tanh(jnp.einsum("dij,djk->dik", x, x) * 0.01)
    return x
  return _median_seconds(jax.jit(chain), _per_device(devices, (8, 8), jnp.float32)) / OP_CHAIN


def probe_dispatch(devices: Sequence[Any]) -> float:
  """Seconds of one call of a program that adds 1 to 8 numbers per device."""
  return _median_seconds(jax.jit(lambda x: x + 1), _per_device(devices, (8,), jnp.float32))


@dataclass
class Calibration:
  """Probed numbers for one set of devices; `matmul_rate` probes a new shape when asked."""

  devices: Sequence[Any]
  path: Path | None  # where it is kept (None: not kept)
  key: str
  entry: dict = field(default_factory=dict)
  read_back: bool = False  # every number came from the file

  def _scalar(self, name: str, probe: Callable[[Sequence[Any]], float]) -> float:
    if name not in self.entry:
      self.entry[name] = probe(self.devices)
      self.entry["when"] = time.strftime("%Y-%m-%d %H:%M")
      self.read_back = False
      self.save()
    return float(self.entry[name])

  @property
  def allreduce_bw(self) -> float:
    return self._scalar("allreduce_bw", probe_allreduce)

  @property
  def op_s(self) -> float:
    return self._scalar("op_s", probe_op)

  @property
  def dispatch_s(self) -> float:
    return self._scalar("dispatch_s", probe_dispatch)

  def matmul_rate(self, m: int, k: int, n: int, dtype=jnp.float32) -> float:
    name = f"matmul {jnp.dtype(dtype).name} {m}x{k}x{n}"
    return self._scalar(name, lambda d: probe_matmul(d, m, k, n, dtype))

  def describe(self) -> str:
    where = f"read from {self.path}" if self.read_back else (
        f"probed {self.entry.get('when', 'now')}, kept in {self.path}" if self.path
        else "probed now (compile cache off: not kept)")
    return f"calibration: {where}"

  def save(self) -> None:
    if self.path is not None:
      write_machine_entry(self.path, self.key, self.entry)


def load_calibration(devices: Sequence[Any], cache_dir: Path | str | None) -> Calibration:
  """This machine's calibration for `devices`: read back from `cache_dir` where it was
  probed before, else empty (each number is probed at its first use and kept)."""
  key = f"{devices[0].platform} {devices[0].device_kind} | {host_key(devices)}"
  path = Path(cache_dir) / CALIBRATION_FILE if cache_dir else None
  entry = read_machine_file(path).get(key) if path else None
  entry = dict(entry) if isinstance(entry, dict) else {}
  return Calibration(list(devices), path, key, entry, read_back=bool(entry))
