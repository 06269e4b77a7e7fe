"""What this machine's devices really do, measured by short probes and kept per machine, so
`lmos plan` predicts step times from measurements instead of assumed constants.

A spec sheet says what a chip can do at best; a small model's matmuls, simulated CPU devices
that share a few cores, or a slow interconnect run far below it. Each number here is a probe
run on the present devices, every device busy at once (so devices that share cores share
them in the probe too):

- `matmul_rate(m, k, n)`: FLOP/s per device of an (m, k) x (k, n) matmul, probed at the shape
  asked (the planner probes every layout's per-device MLP shape at once, `probe_all`);
- `allreduce_bw`: bytes/s of an all-reduce across the devices (ring bus bandwidth);
- `op_s`: seconds of one small dependent op (the floor under each kernel or thunk);
- `dispatch_s`: seconds of one program call with nothing to compute;
- `dot_s(dot)`: seconds of one dot of a compiled program (its exact operand shapes,
  dimension numbers and dtype), probed per distinct dot;
- `stream_s(nbytes, kind)`: seconds of one memory-bound op moving `nbytes` (read +
  written), interpolated between probes at STREAM_BYTES (per-op floor when small, memory
  bandwidth when large), for each kind: elementwise, transposing (the minor dimension
  moves: strided, several times slower), reducing;
- `first_touch_s_per_byte`: what writing freshly mapped memory costs beyond streaming
  (page faults), paid each step for the program's temporaries when the allocator maps
  their block anew at every call (`first_touch_bytes`);
- `collective_s(nbytes)`: `nbytes` at `allreduce_bw`.

`lmos_jax.train.hlo_cost` prices a compiled step op by op with `dot_s`, `stream_s` and
`collective_s`.

The probes take seconds; their results are kept in `lmos_calibration.json` in the compile
cache's directory, keyed like the host peak (CPU model, cores, devices, jax, XLA flags), so a
second plan on the same machine reads them back and another machine measures afresh.
"""

from __future__ import annotations

import functools
import math
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
# how the probes run: numbers kept by probes that ran otherwise are not read back (the dot
# probes before version 2 priced bf16 dots up to 1.9x their time: `_dot_loop`; before
# version 3 each matmul rate was one probe, taken when its layout was estimated)
PROBES_VERSION = 3
ALLREDUCE_BYTES = 16 * 2 ** 20  # per device: large enough that bandwidth, not latency, shows
OP_CHAIN = 200  # dependent small ops timed together for op_s
# bytes moved (read + written) by the elementwise ops probed for stream_s: from a few
# cache lines to well past the last-level cache
STREAM_BYTES = tuple(2 ** e for e in range(12, 27, 2))
PROBE_FLOPS = 2e7  # a probe program repeats a small dot or op until it does about this much
# and a dot at least this many times: each call starts on sleeping threads and operands
# not in cache, and over 2 rounds that start landed on the large dots' price (a bf16
# [1536,2048] x [2048,384] dot: 16.7 ms a round at 2 rounds a call, 14.0-14.3 at 4-16)
DOT_REPEATS = 4
# a small op's probe loops it up to this many times: with at most 16, the call's own cost
# (20-60 us, as noisy) decided the price, and a 4 KiB elementwise op read 0.15-3.4 us from
# one probe to the next; with up to 1024, 0.22-0.28 us
MAX_REPEATS = 4096
# seconds of calls per probe and pass, and passes: a shared machine's slow spells last
# seconds, longer than one probe, so the probes of a program run in passes over all of them
# and each keeps its median (on a 2-core VM one dot read 0.71-1.30x its median in five
# passes, and the sum of a step's 17 dots 5.2-6.4 ms)
PROBE_SECONDS, PROBE_PASSES = 0.1, 3
NUMPY_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64",
                "s8": "int8", "u8": "uint8", "s32": "int32", "u32": "uint32", "pred": "bool"}


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


def _repeats(work: float, per_call: float, least: int = 2) -> int:
  """How many times a probe loop runs its op: enough that the program's call cost is
  small beside them, between `least` and MAX_REPEATS."""
  return int(min(MAX_REPEATS, max(least, math.ceil(work / max(per_call, 1.0)))))


def _per_op_seconds(program_s: float, repeats: int, dispatch_s: float) -> float:
  """One op's seconds from a program that loops over it `repeats` times: the call's own
  cost taken out (never below a tenth of the unadjusted share)."""
  share = program_s / repeats
  return max((program_s - dispatch_s) / repeats, 0.1 * share)


@functools.partial(jax.jit, static_argnames=("dims", "dtype", "out_dtype", "reps"),
                   donate_argnums=0)
def _dot_loop(lhs: jax.Array, rhs: jax.Array, dims, dtype, out_dtype, reps: int) -> jax.Array:
  """`reps` dots in a loop, each writing one element of its output back into its left
  operand so that XLA cannot hoist it out. Jitted once at module level with the shape's
  numbers as static arguments, so probing a dot again (another pass) reuses its compiled
  program.

  The left operand is donated (the caller passes the last call's result back: a carry that
  is not donated is copied at every call), and an operand narrower than 32 bits is carried
  as its bit pattern (`lhs` then holds unsigned integers of its width, `dtype` says what they
  are): written back as bf16, XLA:CPU converted the whole operand to float32 and back at
  every round. With both, a bf16 [2048,1536] x [1536,384] dot probed 17 ms where the same
  dot called alone ran 12.5 ms (and the small shakespeare model's bf16 dots 1.2-1.9x their
  own time). An integer write of one element is done in place; the bf16 view of the bits is
  one pass over the operand per round (XLA:CPU writes a bitcast-convert out), a few percent
  of its dot. Float32 and wider are written in place as they are. Probed this way (and at
  least DOT_REPEATS rounds a call), the 17 dots of that small model's step summed 3.95 ms
  where they summed 5.19 ms as probed before and 4.66 ms called one by one, each call paying
  its own start (2-core VM)."""
  bits = lhs.dtype != dtype  # carried as its bit pattern (`dot_carry`)

  def body(_, x):
    operand = jax.lax.bitcast_convert_type(x, dtype) if bits else x
    out = jax.lax.dot_general(operand, rhs, dims, preferred_element_type=out_dtype)
    corner = out[(slice(None),) + (0,) * (out.ndim - 1)].astype(dtype)
    if bits:
      corner = jax.lax.bitcast_convert_type(corner, x.dtype)
    return x.at[(slice(None),) + (0,) * (x.ndim - 1)].set(corner)
  return jax.lax.fori_loop(0, reps, body, lhs)


def dot_carry(lhs: jax.Array) -> jax.Array:
  """`_dot_loop`'s carry for the left operand `lhs`: its bits where narrower than 32."""
  if lhs.dtype.itemsize >= 4:
    return lhs
  return jax.lax.bitcast_convert_type(lhs, jnp.dtype(f"uint{8 * lhs.dtype.itemsize}"))


def probe_dot(devices: Sequence[Any], dot, dispatch_s: float) -> float:
  """Seconds per device of one dot shaped like `dot` (a `hlo_cost.DotShape`: operand dims,
  contracting and batch dimensions, HLO operand and result dtypes), every device running it
  at once, in a loop as ops run inside a compiled step (buffers reused, no fresh allocation
  per op)."""
  dtype = jnp.dtype(NUMPY_DTYPES.get(dot.dtype, dot.dtype))
  out_name = dot.out_dtype or dot.dtype
  out_dtype = jnp.dtype(NUMPY_DTYPES.get(out_name, out_name))
  reps = _repeats(PROBE_FLOPS, dot.flops, DOT_REPEATS)
  shift = lambda dims: tuple(d + 1 for d in dims)  # past the leading device axis
  dims = ((shift(dot.lhs_contract), shift(dot.rhs_contract)),
          ((0, *shift(dot.lhs_batch)), (0, *shift(dot.rhs_batch))))
  lhs = _per_device(devices, dot.lhs, dtype)
  carry = [dot_carry(lhs)]
  rhs = _per_device(devices, dot.rhs, dtype)

  def call() -> jax.Array:  # the donated carry comes back as the next call's operand
    carry[0] = _dot_loop(carry[0], rhs, dims=dims, dtype=dtype, out_dtype=out_dtype,
                         reps=reps)
    return carry[0]

  return _per_op_seconds(_median_seconds(call, min_seconds=PROBE_SECONDS), reps, dispatch_s)


def _stream_op(kind: str) -> Callable[[jax.Array], jax.Array]:
  """One memory-bound op of each kind the pricing tells apart, on a per-device square
  (axes 1, 2): elementwise, transposing (the minor dimension moves), reducing along the
  minor dimension (and broadcasting back, so the loop carry keeps its shape)."""
  if kind == "stream":
    return lambda x: x * 1.5 + 0.5
  if kind == "transpose":
    return lambda x: jnp.swapaxes(x, 1, 2) * 1.5
  if kind == "reduce":
    return lambda x: x + 1e-3 * jnp.sum(x, axis=2, keepdims=True)
  raise ValueError(f"unknown op kind {kind!r}")


@functools.partial(jax.jit, static_argnames=("kind", "reps"))
def _stream_loop(x: jax.Array, kind: str, reps: int) -> jax.Array:
  """`reps` memory-bound ops of `kind` in a loop (compiled once per shape, like `_dot_loop`)."""
  op = _stream_op(kind)
  return jax.lax.fori_loop(0, reps, lambda _, x: op(x), x)


def probe_stream(devices: Sequence[Any], nbytes: int, dispatch_s: float,
                 kind: str = "stream") -> float:
  """Seconds per device of one memory-bound op of `kind` reading and writing `nbytes` in
  all (f32, in a loop as ops run inside a step), every device running it at once."""
  side = max(int(math.isqrt(max(nbytes // 8, 1))), 1)
  reps = _repeats(2 ** 25, nbytes)  # fewer rounds of the large sizes
  loop = functools.partial(_stream_loop, kind=kind, reps=reps)
  x = _per_device(devices, (side, side), jnp.float32)
  return _per_op_seconds(_median_seconds(loop, x, min_seconds=PROBE_SECONDS), reps, dispatch_s)


def stream_points(nbytes: float) -> tuple[int, ...]:
  """The STREAM_BYTES sizes `Calibration.stream_s` interpolates between for `nbytes`: the
  two around it (past the grid the last two; at or below its first size that one only)."""
  hi = next((i for i, b in enumerate(STREAM_BYTES) if b >= nbytes), len(STREAM_BYTES) - 1)
  return STREAM_BYTES[max(hi - 1, 0):hi + 1]


def probe_pass(probes: dict[str, Callable[[], float]], seconds: dict[str, list[float]]) -> None:
  """One pass over `probes` (name -> probe), each reading appended to `seconds[name]`."""
  for name, probe in probes.items():
    seconds.setdefault(name, []).append(probe())


# per device: past glibc's largest mmap threshold (32 MiB on 64-bit), so that under the
# system allocator every fresh block of this size is mapped anew and its pages fault
FIRST_TOUCH_BYTES = 64 * 2 ** 20
MMAP_CAP_BYTES = 32 * 2 ** 20


def probe_first_touch(devices: Sequence[Any]) -> float:
  """Seconds per byte a program pays to write memory it has just been given: one
  elementwise op into a fresh output, less the same op writing over its donated input
  (the call and the op's own streaming cancel). Under glibc's default policy a block this
  large comes from the kernel zeroed and page-faults on first write; with freed memory
  retained (`mesh.cpu_allocator`) it is ~0."""
  op = lambda x: x * 1.5 + 0.5
  x = _per_device(devices, (FIRST_TOUCH_BYTES // 4,), jnp.float32)
  fresh = _median_seconds(jax.jit(op), x, min_seconds=0.3)
  in_place, carry = jax.jit(op, donate_argnums=0), [op(x)]

  def overwrite() -> jax.Array:
    carry[0] = in_place(carry[0])
    return carry[0]

  return max(fresh - _median_seconds(overwrite, min_seconds=0.3), 0.0) / FIRST_TOUCH_BYTES


def first_touch_bytes(temp_bytes: float) -> float:
  """Bytes of a program's temporaries (one block per call) that fault each call: all of
  them when the block is past glibc's mmap cap (mapped anew and unmapped at every call);
  none below it, where malloc's arenas usually keep the block between calls once the first
  call has raised the dynamic threshold to its size (not always: a process whose first such
  block was 26 MiB faulted it at every call), and `mesh.cpu_allocator=auto` retains freed
  memory from 24 MiB of estimated temporaries on."""
  return temp_bytes if temp_bytes >= MMAP_CAP_BYTES else 0.0


def interpolate_loglog(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
  """y at x on the piecewise-linear log-log curve through (xs, ys); beyond the last point y
  grows in proportion to x (bandwidth-bound), below the first it stays at the first."""
  if x >= xs[-1]:
    return ys[-1] * x / xs[-1]
  return float(np.exp(np.interp(np.log(x), np.log(xs), np.log(ys))))  # flat below xs[0]


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

  def probed(self, name: str, probe: Callable[[Sequence[Any]], float]) -> float:
    """The number kept under `name`, probed (`probe(devices)`) and kept at its first use."""
    if name not in self.entry:
      self.entry[name] = probe(self.devices)
      self.entry["when"] = time.strftime("%Y-%m-%d %H:%M")
      self.entry["probes"] = PROBES_VERSION
      self.read_back = False
      self.save()
    return float(self.entry[name])

  @property
  def allreduce_bw(self) -> float:
    return self.probed("allreduce_bw", probe_allreduce)

  @property
  def op_s(self) -> float:
    return self.probed("op_s", probe_op)

  @property
  def dispatch_s(self) -> float:
    return self.probed("dispatch_s", probe_dispatch)

  def _dot_probe(self, dot) -> tuple[str, Callable[[], float]]:
    """The name a dot's price is kept under, and its probe."""
    return dot.key(), lambda: probe_dot(self.devices, dot, self.dispatch_s)

  def _stream_probes(self, nbytes: float, kind: str) -> dict[str, Callable[[], float]]:
    """The grid sizes a memory-bound op of `nbytes` is priced from: name -> probe (none for
    an op that moves nothing)."""
    return {f"{kind} {b}": (lambda b=b: probe_stream(self.devices, b, self.dispatch_s, kind))
            for b in (stream_points(nbytes) if nbytes > 0 else ())}

  def dot_s(self, dot) -> float:
    name, probe = self._dot_probe(dot)
    return self.probed(name, lambda _: probe())

  def stream_s(self, nbytes: float, kind: str = "stream") -> float:
    if nbytes <= 0:
      return 0.0
    # only the two grid sizes around nbytes are needed (and probed, at their first use)
    ys = [self.probed(name, lambda _, probe=probe: probe())
          for name, probe in self._stream_probes(nbytes, kind).items()]
    return interpolate_loglog(stream_points(nbytes), ys, nbytes)

  def probe_all(self, dots: Sequence[Any] = (), streams: Sequence[tuple[float, str]] = (),
                matmuls: Sequence[tuple[int, int, int, Any]] = ()) -> None:
    """Probes every price of `dots` (DotShapes), `streams` ((bytes, kind) asked of
    `stream_s`) and `matmuls` ((m, k, n, dtype) asked of `matmul_rate`) not kept yet, in
    PROBE_PASSES passes over all of them, and keeps each at its median: what a program's
    pricing (or the analytic ranking of many layouts) needs, probed so that a slow spell of
    the machine lands on one pass of many probes rather than on some probes only."""
    todo = {name: probe for name, probe in self.probes(dots, streams, matmuls).items()
            if name not in self.entry}
    if not todo:
      return
    seconds: dict[str, list[float]] = {name: [] for name in todo}
    for _ in range(PROBE_PASSES):
      probe_pass(todo, seconds)
    for name, values in seconds.items():
      self.probed(name, lambda _, values=values: float(np.median(values)))

  def probes(self, dots: Sequence[Any] = (), streams: Sequence[tuple[float, str]] = (),
             matmuls: Sequence[tuple[int, int, int, Any]] = ()) -> dict[str, Callable[[], float]]:
    """Name -> probe of every price `dots`, `streams` and `matmuls` (as `probe_all` takes
    them) are priced from, kept or not; the call's own cost (`dispatch_s`, which each
    probe takes off) probed first where it is not kept."""
    self.dispatch_s
    todo = dict(self._dot_probe(dot) for dot in dots)
    for nbytes, kind in streams:
      todo.update(self._stream_probes(nbytes, kind))
    todo.update(self._matmul_probe(*shape) for shape in matmuls)
    return todo

  def with_prices(self, seconds: dict[str, float]) -> "Calibration":
    """A copy priced at `seconds` (name -> probed seconds) where it names a price, kept
    nowhere: the prices of another moment (probed beside a measurement, `lmos plan
    --measure`), which must not replace what this machine's calibration keeps."""
    return Calibration(self.devices, None, self.key, {**self.entry, **seconds})

  @property
  def first_touch_s_per_byte(self) -> float:
    return self.probed("first_touch_s_per_byte", probe_first_touch)

  def collective_s(self, nbytes: float) -> float:
    return max(nbytes, 0.0) / self.allreduce_bw

  def _matmul_probe(self, m: int, k: int, n: int, dtype) -> tuple[str, Callable[[], float]]:
    """The name a matmul shape's rate is kept under, and its probe."""
    return (f"matmul {jnp.dtype(dtype).name} {m}x{k}x{n}",
            lambda: probe_matmul(self.devices, m, k, n, dtype))

  def matmul_rate(self, m: int, k: int, n: int, dtype=jnp.float32) -> float:
    name, probe = self._matmul_probe(m, k, n, dtype)
    return self.probed(name, lambda _: probe())

  def describe(self) -> str:
    where = f"read from {self.path}" if self.read_back else (
        f"probed {self.entry.get('when', 'now')}, kept in {self.path}" if self.path
        else "probed now (compile cache off: not kept)")
    return f"calibration: {where}"

  def save(self) -> None:
    if self.path is not None:
      write_machine_entry(self.path, self.key, self.entry)


def load_calibration(devices: Sequence[Any], cache_dir: Path | str | None,
                     fresh: bool = False) -> Calibration:
  """This machine's calibration for `devices`: read back from `cache_dir` where it was
  probed before, else empty (each number is probed at its first use and kept). `fresh`:
  ignore what was kept and probe again (the new numbers replace it): a shared or
  throttled machine's speed moves, and a plan checked against measurements should be
  priced at the speeds of the moment. Numbers kept by another PROBES_VERSION are probed
  again."""
  key = f"{devices[0].platform} {devices[0].device_kind} | {host_key(devices)}"
  path = Path(cache_dir) / CALIBRATION_FILE if cache_dir else None
  entry = read_machine_file(path).get(key) if path and not fresh else None
  ok = isinstance(entry, dict) and entry.get("probes") == PROBES_VERSION
  entry = dict(entry) if ok else {}
  return Calibration(list(devices), path, key, entry, read_back=bool(entry))
