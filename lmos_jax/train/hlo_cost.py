"""Step time of a compiled program, priced op by op from its optimized HLO.

A step's FLOPs at one matmul rate miss most of what a small model's step costs on a CPU or
a small GPU: attention's little batched matmuls run far below the rate of the MLP's, and the
elementwise work, reductions, copies and the optimizer update are bound by memory and by a
fixed cost per op. So the planner prices the program XLA will actually run, per device
(after SPMD partitioning and fusion), instruction by instruction:

- a `dot` (standalone or inside a fusion): at the rate measured for that very dot (same
  operand shapes, contracting and batch dimensions, dtype) on the present devices;
- any other fusion or op that touches memory: at the measured time of one elementwise op
  moving the same number of bytes (which carries the per-op floor at small sizes and the
  memory bandwidth at large ones); in-place updates and slices count only what they move;
- collectives: the bytes a ring moves over the measured all-reduce bandwidth, and counted
  (each also costs a rendezvous, the devices meeting after drifting apart as they work: the
  planner prices it per collective from its reference steps);
- `while` bodies times their known trip count, `call`s once, `conditional`s at their most
  expensive branch; bookkeeping ops (parameters, tuples, bitcasts) cost nothing.

Dots and memory-bound ops moving at most CACHE_BYTES are also summed apart (`cached_s`):
their probes loop over data that stays in cache, and in a step such ops cost other than
probed (what the cache holds when each starts, the executor's gaps between them), so the
planner scales that part by a measured factor; larger ops stream from memory in a probe as
in a step and keep their probed price.

The prices come from `lmos_jax.train.calibrate.Calibration` (probed once per machine and
kept); this module only reads the program. Ops of one device are summed, not overlapped: on
XLA:CPU a device runs its thunks essentially in order.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Protocol

# bytes per element of the HLO element types (pred and the 8-bit types: 1)
ITEM_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
              "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
              "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
FREE_OPS = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast",
                      "partition-id", "replica-id", "after-all", "opt-barrier",
                      "add-dependency", "domain"})
COLLECTIVES = frozenset({"all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                         "collective-permute", "all-reduce-start", "all-gather-start",
                         "collective-permute-start"})
ASYNC_DONE = frozenset({"all-reduce-done", "all-gather-done", "collective-permute-done",
                        "async-done", "async-update", "copy-done", "send-done", "recv-done"})
SLICES = frozenset({"dynamic-slice", "slice", "gather"})
VIEWS = frozenset({"bitcast", "reshape"})  # in a fusion body: an index change, no copy
# bytes an op moves (read + written, per device) up to which its loop probe runs from cache:
# on a 2-core EPYC VM (1 MiB L2 per core, 32 MiB L3) elementwise ops moving 4 MiB streamed
# at 56-91 GB/s, 16 MiB at 18-29 GB/s, 64 MiB at 4.5-7 GB/s (three calibrations)
CACHE_BYTES = 4 * 2 ** 20

_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^(ENTRY\s+)?%([^\s(]+)\s*\(.*\{\s*$")


@dataclasses.dataclass(frozen=True)
class Instr:
  """One HLO instruction: its name, result type text, opcode, operand names and the
  attribute text after the operand list."""

  name: str
  type: str
  opcode: str
  operands: tuple[str, ...]
  attrs: str
  root: bool = False


@dataclasses.dataclass(frozen=True)
class DotShape:
  """What a dot's speed depends on: operand dims, dimension numbers, operand dtype and
  result dtype (XLA:CPU runs bf16 operands with a float32 result 1.9x float32 and with a
  bf16 result slower than float32: experiments/bench_bf16.py)."""

  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  lhs_contract: tuple[int, ...]
  rhs_contract: tuple[int, ...]
  lhs_batch: tuple[int, ...]
  rhs_batch: tuple[int, ...]
  dtype: str
  out_dtype: str = ""  # "": the operands' dtype

  @property
  def flops(self) -> float:
    out = math.prod(self.lhs) * math.prod(self.rhs)
    shared = math.prod(self.lhs[i] for i in self.lhs_contract + self.lhs_batch)
    return 2.0 * out / max(shared, 1)

  def key(self) -> str:
    out = f"->{self.out_dtype}" if self.out_dtype not in ("", self.dtype) else ""
    return (f"dot {self.dtype}{out} {list(self.lhs)}x{list(self.rhs)} "
            f"c{list(self.lhs_contract)}{list(self.rhs_contract)} "
            f"b{list(self.lhs_batch)}{list(self.rhs_batch)}")


class Prices(Protocol):
  """Measured seconds of the three kinds of work (per device, all devices busy)."""

  def dot_s(self, dot: DotShape) -> float: ...
  def stream_s(self, nbytes: float, kind: str = "stream") -> float: ...
  def collective_s(self, nbytes: float) -> float: ...


class AskedPrices:
  """Prices of nothing that note what was asked of them: the dots and the memory-bound ops
  (bytes, kind) whose probes pricing a program needs, so that a calibration can probe them
  all together before the program is priced (`Calibration.probe_all`)."""

  def __init__(self) -> None:
    self.dots: dict[str, DotShape] = {}
    self.streams: set[tuple[float, str]] = set()

  def dot_s(self, dot: DotShape) -> float:
    self.dots[dot.key()] = dot
    return 0.0

  def stream_s(self, nbytes: float, kind: str = "stream") -> float:
    self.streams.add((nbytes, kind))
    return 0.0

  def collective_s(self, nbytes: float) -> float:
    return 0.0


@dataclasses.dataclass
class Breakdown:
  """Predicted seconds of one program call by kind, and the dot shapes seen."""

  dots_s: float = 0.0
  memory_s: float = 0.0
  collectives_s: float = 0.0  # bytes over bandwidth
  collectives: float = 0.0  # how many run per call
  unknown_trip_counts: int = 0  # while loops without a known trip count (priced once)
  cached_s: float = 0.0  # the part of dots_s + memory_s from ops moving <= CACHE_BYTES

  @property
  def total_s(self) -> float:
    return self.dots_s + self.memory_s + self.collectives_s

  def add(self, other: "Breakdown", times: float = 1.0) -> None:
    self.dots_s += times * other.dots_s
    self.memory_s += times * other.memory_s
    self.collectives_s += times * other.collectives_s
    self.collectives += times * other.collectives
    self.unknown_trip_counts += other.unknown_trip_counts
    self.cached_s += times * other.cached_s


def _split_type(text: str) -> tuple[str, str]:
  """('(f32[2]{0}, s32[])', rest) or ('f32[2,3]{1,0}', rest): a tuple type is matched by
  its parentheses, an array type ends at the first space."""
  if text.startswith("("):
    depth = 0
    for i, ch in enumerate(text):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return text[:i + 1], text[i + 1:].lstrip()
  head, _, rest = text.partition(" ")
  return head, rest


def _operands(text: str) -> tuple[tuple[str, ...], str]:
  """Operand names of 'op(%a, %b), attrs' and the attribute text."""
  depth = 0
  for i, ch in enumerate(text):
    depth += ch in "({"
    depth -= ch in ")}"
    if depth == 0 and ch == ")":
      return tuple(re.findall(r"%([^\s,()]+)", text[:i])), text[i + 1:]
  return tuple(re.findall(r"%([^\s,()]+)", text)), ""


def parse_instr(line: str) -> Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  type_text, rest = _split_type(m.group(2))
  opcode, paren, rest = rest.partition("(")
  if not paren:
    return None
  operands, attrs = _operands("(" + rest)
  return Instr(m.group(1), type_text, opcode.strip(), operands, attrs,
               line.lstrip().startswith("ROOT"))


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
  """The computations of an HLO module's text (name -> instructions) and the entry's name."""
  comps: dict[str, list[Instr]] = {}
  entry, current = "", None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m:
      current = m.group(2)
      comps[current] = []
      if m.group(1):
        entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    if current is not None:
      ins = parse_instr(line)
      if ins is not None:
        comps[current].append(ins)
  if not entry:
    raise ValueError("HLO text has no ENTRY computation")
  return comps, entry


def arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """(element type, dims) of every array in a (possibly tuple) type."""
  return [(t, tuple(int(d) for d in dims.split(",") if d))
          for t, dims in _ARRAY.findall(type_text) if t in ITEM_BYTES]


def type_bytes(type_text: str) -> int:
  return sum(ITEM_BYTES[t] * math.prod(dims) for t, dims in arrays(type_text))


def _dims_attr(attrs: str, name: str) -> tuple[int, ...]:
  m = re.search(name + r"=\{([0-9,]*)\}", attrs)
  return tuple(int(x) for x in m.group(1).split(",") if x) if m else ()


def _called(attrs: str, name: str) -> list[str]:
  m = re.search(name + r"=\{([^}]*)\}", attrs)
  if m:
    return re.findall(r"%([^\s,]+)", m.group(1))
  m = re.search(name + r"=%([^\s,]+)", attrs)
  return [m.group(1)] if m else []


def trip_count(attrs: str) -> int | None:
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
  return int(m.group(1)) if m else None


def dot_shape(ins: Instr, types: dict[str, str]) -> DotShape:
  (dtype, lhs), = arrays(types[ins.operands[0]])[:1]
  (_, rhs), = arrays(types[ins.operands[1]])[:1]
  return DotShape(lhs, rhs, _dims_attr(ins.attrs, "lhs_contracting_dims"),
                  _dims_attr(ins.attrs, "rhs_contracting_dims"),
                  _dims_attr(ins.attrs, "lhs_batch_dims"),
                  _dims_attr(ins.attrs, "rhs_batch_dims"), dtype,
                  (arrays(ins.type)[:1] or [(dtype, ())])[0][0])


def _layout(type_text: str) -> tuple[int, ...]:
  """Minor-to-major layout of an array type ('f32[4,8]{0,1}' -> (0, 1)); row-major when
  the text has none."""
  m = re.search(r"\]\{([0-9,]*)", type_text)
  if m:
    return tuple(int(x) for x in m.group(1).split(",") if x)
  (_, dims), = arrays(type_text)[:1] or [("", ())]
  return tuple(reversed(range(len(dims))))


def moves_minor_dim(ins: Instr, types: dict[str, str]) -> bool:
  """True for a transpose or copy whose output's fastest-varying dimension is not its
  input's: a strided, cache-unfriendly copy (several times slower than streaming)."""
  if ins.opcode not in ("transpose", "copy") or not ins.operands:
    return False
  src, dst = _layout(types.get(ins.operands[0], "")), _layout(ins.type)
  if not src or not dst:
    return False
  if ins.opcode == "copy":
    return src[0] != dst[0]
  perm = _dims_attr(ins.attrs, "dimensions")
  return perm[dst[0]] != src[0] if len(perm) > dst[0] else False


def memory_kind(body: list[Instr], types: dict[str, str]) -> str:
  """Which probe prices a memory-bound op (a fusion's body, or one op): 'transpose' when
  any op moves the minor dimension, else 'reduce' when it reduces, else 'stream'."""
  if any(moves_minor_dim(i, types) for i in body):
    return "transpose"
  if any(i.opcode in ("reduce", "reduce-window") for i in body):
    return "reduce"
  return "stream"


def sliced_bytes(name: str, users: dict[str, list[Instr]]) -> float | None:
  """Bytes a fusion body reads of value `name` where it reads it only through slices,
  taken of it or of views of it (a bitcast or reshape moves nothing: the slice indexes the
  value underneath); None where some use reads all of it. The shakespeare baby shape's
  attention splits q, k and v out of one [tokens, 3 x width] projection as bitcast, slice,
  transpose: counted in full, each such fusion was priced at 12.6 MB where it moves 6.3."""
  uses = users.get(name, [])
  if not uses:
    return None
  got = 0.0
  for u in uses:
    if u.opcode in SLICES:
      got += type_bytes(u.type)
      continue
    under = sliced_bytes(u.name, users) if u.opcode in VIEWS else None
    if under is None:
      return None
    got += under
  return got


def fusion_bytes(ins: Instr, comp: list[Instr], types: dict[str, str]) -> float:
  """Bytes a fusion moves: each operand as much as its body reads of it (all of it, or
  only the slices taken, `sliced_bytes`), plus its result (only the update, when the result
  is written in place by a dynamic-update-slice into an operand)."""
  by_name = {i.name: i for i in comp}
  param_of = {i.name: i for i in comp if i.opcode == "parameter"}
  users: dict[str, list[Instr]] = {}
  for i in comp:
    for o in i.operands:
      users.setdefault(o, []).append(i)
  root = next((i for i in comp if i.root), comp[-1])
  roots = [by_name[o] for o in root.operands] if root.opcode == "tuple" else [root]
  in_place = {r.operands[0] for r in roots if r.opcode == "dynamic-update-slice"}
  total = 0.0
  for name, p in param_of.items():
    if name in in_place:
      continue
    full, sliced = type_bytes(p.type), sliced_bytes(name, users)
    total += full if sliced is None else min(full, sliced)
  for r in roots:
    if r.opcode == "dynamic-update-slice":
      total += type_bytes(by_name[r.operands[1]].type) if r.operands[1] in by_name else 0
    else:
      total += type_bytes(r.type)
  return total


def op_bytes(ins: Instr, types: dict[str, str]) -> float:
  """Bytes a non-fusion op moves (read + written)."""
  if ins.opcode in SLICES:
    return 2.0 * type_bytes(ins.type)
  if ins.opcode == "dynamic-update-slice":
    return 2.0 * type_bytes(types.get(ins.operands[1], ""))
  return type_bytes(ins.type) + sum(type_bytes(types.get(o, "")) for o in ins.operands)


def collective_bytes(ins: Instr, types: dict[str, str], num_devices: int) -> float:
  """Bytes one device sends in a ring implementation, as a multiple of the all-reduce
  bus-bandwidth convention (2 (n-1)/n x size for an all-reduce)."""
  groups = re.search(r"replica_groups=\{\{([0-9,]*)\}", ins.attrs)
  n = len(groups.group(1).split(",")) if groups else num_devices
  if n <= 1:
    return 0.0
  size = type_bytes(ins.type)
  if ins.opcode.startswith("all-reduce"):
    return 2.0 * (n - 1) / n * size
  if ins.opcode.startswith("reduce-scatter"):
    size = sum(type_bytes(types.get(o, "")) for o in ins.operands)
  if ins.opcode.startswith("collective-permute"):
    return float(size)
  return (n - 1) / n * size


def price_computation(name: str, comps: dict[str, list[Instr]], prices: Prices,
                      num_devices: int, memo: dict[str, Breakdown] | None = None) -> Breakdown:
  """Predicted seconds of one execution of computation `name`."""
  memo = {} if memo is None else memo
  if name not in memo:
    comp = comps[name]
    types = {i.name: i.type for i in comp}
    out = Breakdown()
    for ins in comp:
      out.add(price_instruction(ins, types, comps, prices, num_devices, memo))
    memo[name] = out
  return memo[name]


def price_instruction(ins: Instr, types: dict[str, str], comps: dict[str, list[Instr]],
                      prices: Prices, num_devices: int,
                      memo: dict[str, Breakdown]) -> Breakdown:
  """Predicted seconds of one instruction (with what it calls); `types`: the result types
  of its computation's instructions, by name."""
  out = Breakdown()
  op = ins.opcode
  nbytes: float | None = None  # what a dot or memory-bound op moves, for `cached_s`
  sub = lambda c: price_computation(c, comps, prices, num_devices, memo)
  if op in FREE_OPS or op in ASYNC_DONE:
    return out
  if op == "while":
    n = trip_count(ins.attrs)
    out.unknown_trip_counts += n is None
    for c in _called(ins.attrs, "body"):
      out.add(sub(c), n or 1)
    for c in _called(ins.attrs, "condition"):
      out.add(sub(c), (n or 1) + 1)
  elif op in ("call", "async-start"):
    for c in _called(ins.attrs, "to_apply") + _called(ins.attrs, "calls"):
      out.add(sub(c))
  elif op == "conditional":
    branches = (_called(ins.attrs, "branch_computations")
                or _called(ins.attrs, "true_computation")
                + _called(ins.attrs, "false_computation"))
    if branches:
      out.add(max((sub(b) for b in branches), key=lambda b: b.total_s))
  elif op in COLLECTIVES:
    out.collectives_s += prices.collective_s(collective_bytes(ins, types, num_devices))
    out.collectives += 1
  elif op == "dot":
    out.dots_s += prices.dot_s(dot_shape(ins, types))
    nbytes = op_bytes(ins, types)
  elif op == "fusion":
    called = _called(ins.attrs, "calls")
    body = comps.get(called[0], []) if called else []
    body_types = {i.name: i.type for i in body}
    dots = [i for i in body if i.opcode == "dot"]
    nbytes = fusion_bytes(ins, body, body_types)
    if dots:
      out.dots_s += sum(prices.dot_s(dot_shape(d, body_types)) for d in dots)
    else:
      out.memory_s += prices.stream_s(nbytes, memory_kind(body, body_types))
  else:
    nbytes = op_bytes(ins, types)
    out.memory_s += prices.stream_s(nbytes, memory_kind([ins], types))
  if nbytes is not None and nbytes <= CACHE_BYTES:
    out.cached_s = out.dots_s + out.memory_s
  return out


def asked_prices(hlo_texts: list[str], num_devices: int) -> AskedPrices:
  """The dots and memory-bound ops whose probes pricing these compiled programs needs."""
  asked = AskedPrices()
  for text in hlo_texts:
    price_program(text, asked, num_devices)
  return asked


def price_program(hlo_text: str, prices: Prices, num_devices: int) -> Breakdown:
  """Predicted seconds of one call of a compiled program (per device), by kind."""
  comps, entry = parse_module(hlo_text)
  return price_computation(entry, comps, prices, num_devices)
