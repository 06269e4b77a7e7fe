"""The planner's op-by-op pricing of compiled programs (lmos_jax.train.hlo_cost): it reads
XLA's optimized HLO the way the devices run it, with stub prices so every count is exact."""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lmos_jax.train import calibrate
from lmos_jax.train import hlo_cost as H
from lmos_jax.train import plan as planner


class CountingPrices:
  """1 s per dot, 1 s per memory-bound op (kinds and bytes recorded), 1 s per collective
  and a rendezvous of a tenth of the work before it."""

  def __init__(self):
    self.dots, self.kinds, self.bytes, self.collective_bytes = [], [], [], []
    self.sync_work = []

  def dot_s(self, dot):
    self.dots.append(dot)
    return 1.0

  def stream_s(self, nbytes, kind="stream"):
    self.kinds.append(kind)
    self.bytes.append(nbytes)
    return 1.0

  def collective_s(self, nbytes):
    self.collective_bytes.append(nbytes)
    return 1.0

  def sync_s(self, work_s):
    self.sync_work.append(work_s)
    return 0.1 * work_s


def hlo(fn, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


def dots_of(text: str) -> list:
  prices = CountingPrices()
  H.price_program(text, prices, 1)
  return prices.dots


def test_a_dot_is_found_with_its_shape_and_flops():
  x, w = jnp.ones((32, 48)), jnp.ones((48, 16))
  dots = dots_of(hlo(lambda x, w: jnp.tanh(x @ w), x, w))
  assert len(dots) == 1
  d = dots[0]
  assert (d.lhs, d.rhs, d.lhs_contract, d.rhs_contract) == ((32, 48), (48, 16), (1,), (0,))
  assert d.flops == 2 * 32 * 48 * 16


def test_a_dot_records_its_result_dtype_apart_from_its_operands():
  # bf16 x bf16 -> f32 is its own price (XLA:CPU runs it 1.9x f32; a bf16 result it
  # computes as an f32 dot between converts, which is priced as that f32 dot)
  x, w = jnp.ones((32, 48), jnp.bfloat16), jnp.ones((48, 16), jnp.bfloat16)
  wide, = dots_of(hlo(lambda x, w: jnp.tanh(jax.lax.dot(
      x, w, preferred_element_type=jnp.float32)), x, w))
  assert (wide.dtype, wide.out_dtype) == ("bf16", "f32") and "bf16->f32" in wide.key()
  f32, = dots_of(hlo(lambda x, w: x @ w, jnp.ones((32, 48)), jnp.ones((48, 16))))
  assert f32.out_dtype == "f32" and "->" not in f32.key()  # f32 keys: the plain form


def test_a_batched_dot_counts_its_batch_once():
  a, b = jnp.ones((3, 8, 5)), jnp.ones((3, 5, 7))
  d, = dots_of(hlo(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b))
  assert d.lhs_batch == (0,) and d.flops == 2 * 3 * 8 * 5 * 7


def test_a_loop_body_is_priced_times_its_trip_count():
  w = jnp.eye(64) * 0.5

  def loop(x):
    return jax.lax.fori_loop(0, 7, lambda _, x: jnp.tanh(x @ w), x)

  prices = CountingPrices()
  b = H.price_program(hlo(loop, jnp.ones((64, 64))), prices, 1)
  assert b.unknown_trip_counts == 0
  assert b.dots_s == 7.0  # one dot, run 7 times
  assert len(prices.dots) == 1  # priced once, multiplied: not walked 7 times


def test_memory_bound_ops_are_told_apart_by_kind():
  x = jnp.ones((256, 128))
  for fn, kind in ((lambda x: x * 2.0 + 1.0, "stream"),
                   (lambda x: (x * 2.0).T + 0.0, "transpose"),
                   (lambda x: jnp.sum(x * x, axis=1), "reduce")):
    prices = CountingPrices()
    H.price_program(hlo(fn, x), prices, 1)
    assert kind in prices.kinds, (kind, prices.kinds)
    if kind == "stream":
      assert prices.bytes == [2 * x.size * 4]  # read once, written once


def test_ops_that_fit_in_cache_are_summed_apart():
  """An elementwise op on 1 MiB and a dot of 64x64 matrices move less than CACHE_BYTES and
  count in `cached_s`; the same op on 8 MiB (16 MiB moved) counts in the total only."""
  small, large = jnp.ones((512, 512)), jnp.ones((2048, 1024))
  for x, cached in ((small, 1.0), (large, 0.0)):
    b = H.price_program(hlo(lambda x: x * 2.0 + 1.0, x), CountingPrices(), 1)
    assert (b.memory_s, b.cached_s) == (1.0, cached)
  m = jnp.ones((64, 64))
  b = H.price_program(hlo(lambda a, b: a @ b, m, m), CountingPrices(), 1)
  assert b.dots_s == 1.0 and b.cached_s == 1.0


def test_an_in_place_update_moves_only_the_update():
  """A dynamic-update-slice into a large buffer (a scan's stacked output, an optimizer
  slot) costs the slice it writes, not the whole buffer."""
  text = """HloModule m

%fused (p0: f32[1024,256], p1: f32[1,256], p2: s32[]) -> f32[1024,256] {
  %p0 = f32[1024,256]{1,0} parameter(0)
  %p1 = f32[1,256]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = f32[1024,256]{1,0} dynamic-update-slice(%p0, %p1, %p2, %z)
}

%fused.2 (q0: f32[1024,256], q1: s32[]) -> f32[1,256] {
  %q0 = f32[1024,256]{1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[1,256]{1,0} dynamic-slice(%q0, %q1, %z), dynamic_slice_sizes={1,256}
}

ENTRY %main (a: f32[1024,256], u: f32[1,256], i: s32[]) -> f32[1024,256] {
  %a = f32[1024,256]{1,0} parameter(0)
  %u = f32[1,256]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %row = f32[1,256]{1,0} fusion(%a, %i), kind=kLoop, calls=%fused.2
  ROOT %f = f32[1024,256]{1,0} fusion(%a, %row, %i), kind=kLoop, calls=%fused
}
"""
  prices = CountingPrices()
  H.price_program(text, prices, 1)
  row = 256 * 4
  # the slice reads one row (+ its index) and writes one; the update reads and writes one
  assert sorted(prices.bytes) == [row + 4 + row, row + row + 4]


def test_a_collective_is_priced_by_the_bytes_a_ring_moves():
  devices = jax.devices()[:2]
  mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
  f = jax.shard_map(lambda v: jax.lax.psum(v, "d"), mesh=mesh, in_specs=PartitionSpec("d"),
                    out_specs=PartitionSpec("d"))
  x = jax.device_put(jnp.ones((2 * 1000,)), NamedSharding(mesh, PartitionSpec("d")))
  prices = CountingPrices()
  b = H.price_program(hlo(f, x), prices, 2)
  # an all-reduce of 1000 floats per device over 2 devices: 2 (n-1)/n x 4000 bytes
  assert prices.collective_bytes == [4000.0] and b.collectives_s == 1.0
  # one rendezvous, after all the program's other work
  assert b.collectives == 1 and prices.sync_work == [b.dots_s + b.memory_s]
  assert b.syncs_s == pytest.approx(0.1 * (b.dots_s + b.memory_s))


def test_minor_dimension_moves_are_read_from_layouts():
  types = {"a": "f32[4,8]{1,0}"}
  t = H.Instr("t", "f32[8,4]{1,0}", "transpose", ("a",), ", dimensions={1,0}")
  keep = H.Instr("t", "f32[4,8,2]{2,1,0}", "transpose", ("b",), ", dimensions={1,0,2}")
  copy = H.Instr("c", "f32[4,8]{0,1}", "copy", ("a",), "")
  assert H.moves_minor_dim(t, types)
  assert not H.moves_minor_dim(keep, {"b": "f32[8,4,2]{2,1,0}"})  # rows move, not the minor
  assert H.moves_minor_dim(copy, types)


def test_loglog_interpolation_hits_the_probes_and_scales_past_them():
  xs, ys = (1e3, 1e5), (1e-6, 1e-4)
  assert calibrate.interpolate_loglog(xs, ys, 1e3) == pytest.approx(1e-6)
  assert calibrate.interpolate_loglog(xs, ys, 1e4) == pytest.approx(1e-5)  # geometric middle
  assert calibrate.interpolate_loglog(xs, ys, 10.0) == pytest.approx(1e-6)  # the floor
  assert calibrate.interpolate_loglog(xs, ys, 1e6) == pytest.approx(1e-3)  # bandwidth-bound


def test_stream_prices_probe_only_the_sizes_around_the_request(tmp_path, monkeypatch):
  asked = []

  def probe(devices, nbytes, dispatch_s, kind="stream"):
    asked.append((kind, nbytes))
    return nbytes * 1e-10

  monkeypatch.setattr(calibrate, "probe_stream", probe)
  monkeypatch.setattr(calibrate, "probe_dispatch", lambda d: 0.0)
  cal = calibrate.load_calibration(jax.devices()[:2], tmp_path)
  grid = calibrate.STREAM_BYTES
  want = math.exp((math.log(grid[2] * 1e-10) + math.log(grid[3] * 1e-10)) / 2)
  assert cal.stream_s(math.sqrt(grid[2] * grid[3]), "transpose") == pytest.approx(want)
  assert asked == [("transpose", grid[2]), ("transpose", grid[3])]
  assert cal.stream_s(0) == 0.0
  again = calibrate.load_calibration(jax.devices()[:2], tmp_path)
  again.stream_s(grid[3], "transpose")
  assert len(asked) == 2  # kept and read back
  fresh = calibrate.load_calibration(jax.devices()[:2], tmp_path, fresh=True)
  fresh.stream_s(grid[3], "transpose")
  assert len(asked) == 4  # --recalibrate: probed again


def test_real_probes_of_a_dot_a_stream_and_a_rendezvous_are_plausible():
  two = jax.devices()[:2]
  d = H.DotShape((64, 32), (32, 16), (1,), (0,), (), (), "f32")
  assert 0 < calibrate.probe_dot(two, d, 0.0) < 0.1
  mixed = H.DotShape((64, 32), (32, 16), (1,), (0,), (), (), "bf16", "f32")
  assert 0 < calibrate.probe_dot(two, mixed, 0.0) < 0.1
  small = calibrate.probe_stream(two, 1 << 14, 0.0)
  assert 0 < small < 0.01
  assert calibrate.probe_stream(two, 1 << 14, 0.0, "transpose") > 0
  work, wait = calibrate.probe_collective_sync(two, 32)
  assert 0 < work < 0.01 and 0 <= wait < 0.1


def test_rendezvous_prices_interpolate_in_the_work_before_them(tmp_path, monkeypatch):
  sides = []

  def probe(devices, side):
    sides.append(side)
    return side * 1e-6, side * 1e-7  # work, wait: the wait a tenth of the work

  monkeypatch.setattr(calibrate, "probe_collective_sync", probe)
  cal = calibrate.load_calibration(jax.devices()[:2], tmp_path)
  lo, hi = calibrate.SYNC_SIDES[0], calibrate.SYNC_SIDES[-1]
  assert cal.sync_s(lo * 1e-6) == pytest.approx(lo * 1e-7)
  assert cal.sync_s(3 * lo * 1e-6) == pytest.approx(3 * lo * 1e-7)
  assert cal.sync_s(10 * hi * 1e-6) == pytest.approx(hi * 1e-7)  # no growth past the probes
  assert cal.sync_s(0.0) == pytest.approx(lo * 1e-7)  # nor below them
  assert sorted(sides) == sorted(calibrate.SYNC_SIDES)
  again = calibrate.load_calibration(jax.devices()[:2], tmp_path)
  assert again.sync_s(lo * 1e-6) == pytest.approx(lo * 1e-7) and len(sides) == 3
  assert calibrate.load_calibration(jax.devices()[:1], tmp_path).sync_s(1.0) == 0.0


def test_a_rendezvous_probe_below_a_smaller_ones_is_taken_as_noise(tmp_path, monkeypatch):
  waits = {64: 2e-4, 256: 0.0, 1024: 1e-3}  # the middle probe came out at nothing
  monkeypatch.setattr(calibrate, "probe_collective_sync",
                      lambda devices, side: (side * 1e-6, waits[side]))
  cal = calibrate.load_calibration(jax.devices()[:2], tmp_path)
  assert cal.sync_s(256e-6) == pytest.approx(2e-4)  # the running maximum
  assert 2e-4 < cal.sync_s(640e-6) < 1e-3


class StubCalibration:
  """The prices of CountingPrices in seconds, plus the scalars the planner reads."""

  dispatch_s, first_touch_s_per_byte = 0.5, 1e-9
  allreduce_bw, op_s = math.inf, 0.0  # the analytic model's, for the FLOPs count

  def matmul_rate(self, m, k, n, dtype):
    return 1e9

  def __init__(self, factor):
    self.factor, self.names = factor, []

  dot_s = CountingPrices.dot_s
  stream_s = CountingPrices.stream_s
  collective_s = CountingPrices.collective_s
  sync_s = CountingPrices.sync_s

  def probed(self, name, probe):
    self.names.append(name)
    return self.factor


def test_a_compiled_candidate_is_priced_from_its_program(cpu8):
  """Predicted step = ops that fit in cache x the machine's program factor + the other
  ops + the first write of the temporaries (none: a tiny program's block stays in malloc's
  arenas) + one call."""
  from test_planner import tiny_cfg
  cfg = tiny_cfg()
  cfg.train.precision = "fp32"  # `auto` would follow this CPU's flags
  lay = Layout(data=8, fsdp=1, tensor=1, microbatches=1, remat="none")
  cal = StubCalibration(factor=1.5)
  cal.dots, cal.kinds, cal.bytes, cal.collective_bytes, cal.sync_work = [], [], [], [], []
  target = planner.Target(cpu8.chip, 8, described=False, calibration=cal)
  s = planner.model_shape(cfg, 256, "cpu")
  est = planner.compiled_estimate(cfg, 256, lay, target, s)
  # on CPU `mesh.opt_state=auto` keeps the state replicated: so is the reference step
  assert est.source.startswith("compiled HLO") and cal.names == ["program_factor replicated"]
  compiled = planner.build_step(planner.apply_overrides(cfg, lay.overrides()), 256,
                                jax.devices()[:8]).compile()
  ops = H.price_program(compiled.as_text(), CountingPrices(), 8)  # 1 s per op run
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert ops.total_s > 20 and ops.collectives_s >= 1  # data parallel: grads all-reduced
  assert temp < calibrate.MMAP_CAP_BYTES
  assert est.step_s == pytest.approx(ops.cached_s * 1.5 + (ops.total_s - ops.cached_s) + 0.5)


@pytest.fixture(scope="module")
def cpu8():
  return planner.present_target(8, peak_flops=1e10)


Layout = planner.Layout


def test_the_program_factor_is_measured_on_the_reference_step(tmp_path, monkeypatch):
  """The real reference step on 2 devices, priced at stand-in speeds (the real probes are
  tested above): a finite positive factor, kept with the calibration, one per policy and
  optimizer-state split."""
  monkeypatch.setattr(calibrate, "probe_dot", lambda d, dot, disp: dot.flops / 1e10)
  monkeypatch.setattr(calibrate, "probe_stream", lambda d, n, disp, kind="stream": n / 1e10)
  monkeypatch.setattr(calibrate, "probe_collective_sync", lambda d, side: (side ** 3 / 1e10, 0))
  monkeypatch.setattr(calibrate, "probe_first_touch", lambda d: 0.0)
  # one short timed round instead of the settled median a real plan waits for
  monkeypatch.setattr(planner, "REFERENCE_WARMUP_ROUNDS", 0)
  monkeypatch.setattr(planner, "REFERENCE_ROUNDS", 1)
  monkeypatch.setattr(planner, "REFERENCE_STEPS", 2)
  monkeypatch.setattr(planner, "REFERENCE_REPEATS", 1)
  cal = calibrate.load_calibration(jax.devices()[:2], tmp_path)
  factor = planner.program_factor(cal, 2)
  assert 0 < factor < math.inf
  bf16 = planner.program_factor(cal, 2, "bf16_matmul")
  assert 0 < bf16 < math.inf
  replicated = planner.program_factor(cal, 2, "bf16_matmul", split_opt_state=False)
  assert 0 < replicated < math.inf
  again = calibrate.load_calibration(jax.devices()[:2], tmp_path)
  assert again.entry["program_factor"] == factor
  assert again.entry["program_factor bf16_matmul"] == bf16
  assert again.entry["program_factor bf16_matmul replicated"] == replicated


def test_the_program_factor_takes_the_fastest_median_of_its_repeats(monkeypatch):
  """A slow spell inside one repeat leaves the factor alone: the rounds' median per repeat,
  then the fastest repeat, less the dispatch, over the priced seconds. Rounds are scripted
  (seconds per step), the step itself is not run."""
  rounds = iter([9.0, 9.0,                          # warm-up rounds, ignored
                 0.030, 0.032, 0.090,               # repeat 1 (a spell): median 0.032
                 0.021, 0.050, 0.020,               # repeat 2: median 0.021
                 0.026, 0.024, 0.025])              # repeat 3: median 0.025
  monkeypatch.setattr(planner, "REFERENCE_WARMUP_ROUNDS", 2)
  monkeypatch.setattr(planner, "REFERENCE_ROUNDS", 3)
  monkeypatch.setattr(planner, "REFERENCE_REPEATS", 3)
  monkeypatch.setattr(planner, "_runner", lambda c, vocab, n: SimpleNamespace(compiled=None))
  monkeypatch.setattr(planner, "_time_round", lambda r, steps: next(rounds))
  # 10 ms of ops that fit in cache, 2 ms of the rest (priced as they are, not scaled)
  monkeypatch.setattr(planner, "priced_seconds", lambda compiled, cal, n: (0.010, 0.002))
  factor = planner.measure_reference(SimpleNamespace(dispatch_s=0.001), 2)
  assert factor == pytest.approx((0.021 - 0.001 - 0.002) / 0.010)
  assert next(rounds, None) is None  # every scripted round was timed
