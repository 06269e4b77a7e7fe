"""The planner's op-by-op pricing of compiled programs (lmos_jax.train.hlo_cost): it reads
XLA's optimized HLO the way the devices run it, with stub prices so every count is exact."""

import json
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
from lmos_jax.train import plan_command


class CountingPrices:
  """1 s per dot, 1 s per memory-bound op (kinds and bytes recorded), 1 s per collective."""

  def __init__(self):
    self.dots, self.kinds, self.bytes, self.collective_bytes = [], [], [], []

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


def test_a_slice_taken_through_a_view_reads_only_the_slice():
  """Attention splitting q, k, v out of one projection: XLA's fusion bitcasts the
  [tokens, 3 x width] input to [tokens, 3, width] and slices one third; the fusion reads that
  third, not the whole input. Where the program also reads all of it (a sum over it), that
  read counts all of it."""
  qkv = jnp.ones((512, 3 * 128))

  def split(x):
    return x.reshape(512, 3, 4, 32)[:, 1].transpose(1, 0, 2) + 0.0

  prices = CountingPrices()
  H.price_program(hlo(split, qkv), prices, 1)
  third = 512 * 128 * 4
  assert prices.bytes == [2 * third]  # a third read, a third written
  prices = CountingPrices()
  H.price_program(hlo(lambda x: split(x) + x[:, :128].reshape(512, 4, 32).transpose(1, 0, 2)
                      * x.sum(), qkv), prices, 1)
  assert max(prices.bytes) >= 3 * third  # the sum reads the whole input


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
  assert b.collectives == 1  # one rendezvous, priced by the planner


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


def test_a_programs_probes_run_in_passes_and_each_keeps_its_median(tmp_path, monkeypatch):
  """Every probe a program (or the analytic ranking) needs, in passes over all of them (a
  slow spell lands on one pass, not on some probes); the median of its passes kept; a price
  kept already is not probed again; a stream request probes the two grid sizes around it."""
  calls, pass_value = [], {}

  def scripted(name):
    pass_value[name] = pass_value.get(name, 0) + 1
    calls.append(name)
    return {1: 1.0, 2: 3.0, 3: 2.0}[pass_value[name]]  # median 2.0

  monkeypatch.setattr(calibrate, "PROBE_PASSES", 3)
  monkeypatch.setattr(calibrate, "probe_dot", lambda d, dot, disp: scripted(dot.key()))
  monkeypatch.setattr(calibrate, "probe_stream",
                      lambda d, b, disp, kind="stream": scripted(f"{kind} {b}"))
  monkeypatch.setattr(calibrate, "probe_matmul",
                      lambda d, m, k, n, dtype: scripted(f"matmul {m}x{k}x{n}"))
  monkeypatch.setattr(calibrate, "probe_dispatch", lambda d: 0.0)
  grid = calibrate.STREAM_BYTES
  cal = calibrate.load_calibration(jax.devices()[:2], tmp_path)
  cal.entry[f"stream {grid[2]}"] = 5.0  # kept from an earlier plan
  dot = H.DotShape((64, 32), (32, 16), (1,), (0,), (), (), "f32")
  cal.probe_all([dot], [(1.5 * grid[2], "stream"), (grid[0], "reduce")],
                [(64, 32, 128, jnp.float32)])
  names = [dot.key(), f"stream {grid[3]}", f"reduce {grid[0]}", "matmul 64x32x128"]
  assert calls == names * 3  # three passes over the same probes, in turns
  kept = names[:3] + ["matmul float32 64x32x128"]
  assert all(cal.entry[n] == 2.0 for n in kept) and cal.entry[f"stream {grid[2]}"] == 5.0
  assert cal.dot_s(dot) == 2.0 and cal.matmul_rate(64, 32, 128) == 2.0
  assert len(calls) == 12  # priced from what was kept
  again = calibrate.load_calibration(jax.devices()[:2], tmp_path)
  again.probe_all([dot], [], [(64, 32, 128, jnp.float32)])
  assert len(calls) == 12 and again.entry[dot.key()] == 2.0  # read back, not probed


def test_numbers_kept_by_other_probes_are_probed_again(tmp_path):
  cal = calibrate.load_calibration(jax.devices()[:2], tmp_path)
  cal.probed("op_s", lambda _: 1e-6)
  assert calibrate.load_calibration(jax.devices()[:2], tmp_path).entry["op_s"] == 1e-6
  calibrate.write_machine_entry(tmp_path / calibrate.CALIBRATION_FILE, cal.key,
                                {**cal.entry, "probes": calibrate.PROBES_VERSION - 1})
  again = calibrate.load_calibration(jax.devices()[:2], tmp_path)
  assert again.entry == {} and not again.read_back


def test_dot_probe_writes_one_element_back_in_place():
  """The probe's loop converts no bf16 operand to float32 and back at each round and
  copies none per call (its only passes over the operand: the dot, the in-place write of
  one element and the bf16 view of the bits)."""
  two = jax.devices()[:2]
  dims = (((2,), (1,)), ((0,), (0,)))
  for dtype, views in ((jnp.bfloat16, 1), (jnp.float32, 0)):
    lhs = calibrate._per_device(two, (64, 32), dtype)
    rhs = calibrate._per_device(two, (32, 16), dtype)
    text = calibrate._dot_loop.lower(
        calibrate.dot_carry(lhs), rhs, dims=dims, dtype=jnp.dtype(dtype),
        out_dtype=jnp.dtype(jnp.float32), reps=4).compile().as_text()
    ops = [i for line in text.splitlines() if (i := H.parse_instr(line)) is not None]
    sized = [i for i in ops if any(math.prod(d) >= 64 * 32 for _, d in H.arrays(i.type))
             and i.opcode not in ("parameter", "bitcast", "get-tuple-element", "tuple",
                                  "while", "dot")]
    writes = [i for i in sized if i.opcode == "dynamic-update-slice"]
    assert len(writes) == 1  # in place, inside its fusion
    wasted = [f"{i.opcode} {i.type}" for i in sized if i.opcode == "copy"
              or (dtype == jnp.bfloat16 and H.arrays(i.type)[0][0] == "f32")]
    assert not wasted, wasted
    # the fusions around the write and the bits' view: nothing else of the operand's size
    assert len([i for i in sized if i.opcode == "fusion"]) == 1 + views, sized


def test_real_probes_of_a_dot_and_a_stream_are_plausible():
  two = jax.devices()[:2]
  d = H.DotShape((64, 32), (32, 16), (1,), (0,), (), (), "f32")
  assert 0 < calibrate.probe_dot(two, d, 0.0) < 0.1
  compiled = calibrate._dot_loop._cache_size()
  assert 0 < calibrate.probe_dot(two, d, 0.0) < 0.1  # another pass: the same program
  assert calibrate._dot_loop._cache_size() == compiled
  mixed = H.DotShape((64, 32), (32, 16), (1,), (0,), (), (), "bf16", "f32")
  assert 0 < calibrate.probe_dot(two, mixed, 0.0) < 0.1
  small = calibrate.probe_stream(two, 1 << 14, 0.0)
  assert 0 < small < 0.01
  assert calibrate.probe_stream(two, 1 << 14, 0.0, "transpose") > 0


class StubCalibration:
  """The prices of CountingPrices in seconds, plus the scalars the planner reads and the
  reference steps' speed, as kept in a calibration file."""

  dispatch_s, first_touch_s_per_byte = 0.5, 1e-9
  allreduce_bw, op_s = math.inf, 0.0  # the analytic model's, for the FLOPs count

  def matmul_rate(self, m, k, n, dtype):
    return 1e9

  def __init__(self, factor, wait):
    self.entry = {"step factor": factor, "collective wait": wait}

  dot_s = CountingPrices.dot_s
  stream_s = CountingPrices.stream_s
  collective_s = CountingPrices.collective_s

  def probe_all(self, dots=(), streams=(), matmuls=()):
    pass  # nothing to probe: every price is a stand-in


def test_a_compiled_candidate_is_priced_from_its_program(cpu8):
  """Predicted step = ops that fit in cache x the machine's program factor + the other
  ops + a wait per collective + the first write of the temporaries (none: a tiny program's
  block stays in malloc's arenas) + one call."""
  from test_planner import tiny_cfg
  cfg = tiny_cfg()
  cfg.train.precision = "fp32"  # `auto` would follow this CPU's flags
  lay = Layout(data=8, fsdp=1, tensor=1, microbatches=1, remat="none")
  cal = StubCalibration(factor=1.5, wait=0.25)
  cal.dots, cal.kinds, cal.bytes, cal.collective_bytes = [], [], [], []
  target = planner.Target(cpu8.chip, 8, described=False, calibration=cal)
  s = planner.model_shape(cfg, 256, "cpu")
  est = planner.compiled_estimate(cfg, 256, lay, target, s)
  assert est.source.startswith("compiled HLO")
  compiled = planner.build_step(planner.apply_overrides(cfg, lay.overrides()), 256,
                                jax.devices()[:8]).compile()
  ops = H.price_program(compiled.as_text(), CountingPrices(), 8)  # 1 s per op run
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert ops.total_s > 20 and ops.collectives >= 1  # data parallel: grads all-reduced
  assert temp < calibrate.MMAP_CAP_BYTES
  assert est.step_s == pytest.approx(ops.cached_s * 1.5 + (ops.total_s - ops.cached_s)
                                     + ops.collectives * 0.25 + 0.5)


@pytest.fixture(scope="module")
def cpu8():
  return planner.present_target(8, peak_flops=1e10)


Layout = planner.Layout


def stand_in_probes(monkeypatch) -> None:
  """Probes priced at stand-in speeds (the real probes are tested above) and short timed
  rounds of the reference steps instead of the settled medians a real plan waits for."""
  monkeypatch.setattr(calibrate, "probe_dot", lambda d, dot, disp: dot.flops / 1e10)
  monkeypatch.setattr(calibrate, "probe_stream", lambda d, n, disp, kind="stream": n / 1e10)
  monkeypatch.setattr(calibrate, "probe_first_touch", lambda d: 0.0)
  monkeypatch.setattr(calibrate, "probe_matmul", lambda d, m, k, n, dtype: 1e10)
  monkeypatch.setattr(planner, "REFERENCE_WARMUP_ROUNDS", 0)
  monkeypatch.setattr(planner, "REFERENCE_ROUNDS", 1)
  monkeypatch.setattr(planner, "REFERENCE_STEPS", 2)


def test_the_step_speed_is_measured_on_the_reference_steps(tmp_path, monkeypatch):
  """The real reference steps on 2 devices, priced at stand-in speeds (the real probes are
  tested above): the fully sharded one runs more collectives than the data-parallel one;
  a finite positive factor and a wait of at least 0, kept with the calibration, one pair
  per precision policy."""
  stand_in_probes(monkeypatch)
  cal = calibrate.load_calibration(jax.devices()[:2], tmp_path)
  priced = [planner.priced_seconds(planner._runner(planner.reference_config(2, fsdp=f), 256,
                                                   2).compiled, cal, 2)
            for f in (False, True)]
  assert priced[0].collectives >= 1 and priced[1].collectives > priced[0].collectives + 5
  factor, wait = planner.program_speed(cal, 2)
  assert 0 < factor < math.inf and 0 <= wait < 1
  bf16 = planner.program_speed(cal, 2, "bf16_matmul")
  assert 0 < bf16[0] < math.inf
  again = calibrate.load_calibration(jax.devices()[:2], tmp_path)
  assert planner.program_speed(again, 2) == (factor, wait)  # read back, not measured
  assert again.entry["step factor bf16_matmul"] == bf16[0]
  assert again.entry["collective wait bf16_matmul"] == bf16[1]


def test_the_factor_and_the_wait_solve_the_two_reference_steps(monkeypatch):
  """Rounds are scripted (seconds per step, taken in turns), the steps are not run: each
  step's median round, less the call, is factor x cached + rest + collectives x wait."""
  rounds = iter([9.0, 9.0, 9.0, 9.0,                # warm-up rounds, ignored
                 0.021, 0.031,
                 0.050, 0.090,                       # a slow spell: not the median
                 0.020, 0.030])
  monkeypatch.setattr(planner, "REFERENCE_WARMUP_ROUNDS", 2)
  monkeypatch.setattr(planner, "REFERENCE_ROUNDS", 3)
  monkeypatch.setattr(planner, "_runner", lambda c, vocab, n: SimpleNamespace(
      compiled=c.mesh.fsdp))
  monkeypatch.setattr(planner, "_time_round", lambda r, steps: next(rounds))
  # data-parallel: 10 ms cached, 2 ms rest, 1 collective; sharded: 11 collectives
  priced = {1: planner.Priced(0.010, 0.002, 1), 2: planner.Priced(0.010, 0.003, 11)}
  monkeypatch.setattr(planner, "priced_seconds", lambda compiled, cal, n: priced[compiled])
  factor, wait = planner.measure_reference(SimpleNamespace(dispatch_s=0.001), 2)
  # 0.020 = 0.010 f + 0.002 + w and 0.030 = 0.010 f + 0.003 + 11 w
  assert wait == pytest.approx(0.0009) and factor == pytest.approx(1.71)
  assert next(rounds, None) is None  # every scripted round was timed


def test_a_negative_wait_is_noise_and_one_step_sets_the_factor():
  dp, fsdp = planner.Priced(0.010, 0.002, 1), planner.Priced(0.010, 0.002, 11)
  assert planner.solve_speed([0.020, 0.019], [dp, fsdp]) == pytest.approx((1.8, 0.0))
  assert planner.solve_speed([0.020], [dp]) == pytest.approx((1.8, 0.0))


def test_measured_candidates_are_predicted_again_with_the_reference_timed_alongside(
    monkeypatch, capsys):
  """--measure times the reference steps in the same rounds as the candidates, probes the
  prices again in those rounds (one pass per round), and predicts each candidate again from
  the probes' medians with the (factor, wait) the reference steps give; the prediction from
  the calibration's numbers stays beside it. Rounds and probe readings are scripted."""
  per_step = {"a": 0.030, "b": 0.040, "dp": 0.021, "fsdp": 0.031}
  timed = []
  readings = iter([1.0, 2.5, 1.5, 1.4, 1.6])  # the probe of the candidates' large dot

  def time_round(r, steps):
    timed.append(r.name)
    return per_step[r.name]

  def probe():
    timed.append("probe")
    return next(readings)

  def priced(compiled, cal, n):
    """The reference steps' prices; the candidates' large ops at the probed dot price."""
    dot = cal.entry["dot big"]
    return {"dp": planner.Priced(0.010, 0.002, 1), "fsdp": planner.Priced(0.010, 0.003, 11),
            "a": planner.Priced(0.020, 0.004 * dot, 1),
            "b": planner.Priced(0.020, 0.005 * dot, 30)}[compiled]

  monkeypatch.setattr(planner, "_runner", lambda c, vocab, n, program=None: SimpleNamespace(
      name="a" if c.mesh.data == 2 else "b", compiled="a" if c.mesh.data == 2 else "b",
      build=SimpleNamespace(policy="fp32")))
  monkeypatch.setattr(planner, "reference_runners", lambda n, policy, scan: [
      SimpleNamespace(name=k, compiled=k) for k in ("dp", "fsdp")])
  monkeypatch.setattr(planner, "_time_round", time_round)
  monkeypatch.setattr(planner, "peak_bytes", lambda devices: 1.0)
  monkeypatch.setattr(planner, "priced_seconds", priced)
  monkeypatch.setattr(planner, "program_probes", lambda cal, compiled, n: (
      {"dot big": probe} if list(compiled) == ["a", "b", "dp", "fsdp"] else {}))
  from test_planner import tiny_cfg
  cfg = tiny_cfg()
  a = planner.Estimate(Layout(2, 1, 1, 1, "none"), 1e6, 0.05, 1e9, "compiled HLO",
                       priced=planner.Priced(0.020, 0.004, 1))
  b = planner.Estimate(Layout(1, 2, 1, 1, "none"), 2e6, 0.06, 1e9, "compiled HLO",
                       priced=planner.Priced(0.020, 0.005, 30))
  cal = calibrate.Calibration([], None, "test", {"dispatch_s": 0.001, "dot big": 1.0})
  target = SimpleNamespace(num_devices=2, calibration=cal)
  (ma, mb), speed = planner.measure_estimates(cfg, 256, [a, b], target, steps=3)
  assert speed == pytest.approx((1.71, 0.0009))  # as in the scripted solve above
  # the large ops at the median probe (1.5, not the calibration's 1.0)
  assert ma.predicted_alongside_s == pytest.approx(0.020 * 1.71 + 0.004 * 1.5 + 0.0009 + 0.001)
  assert mb.predicted_alongside_s == pytest.approx(
      0.020 * 1.71 + 0.005 * 1.5 + 30 * 0.0009 + 0.001)
  assert (ma.step_s, mb.step_s) == (0.05, 0.06)  # the calibration's prediction is kept
  assert (ma.measured_step_s, mb.measured_step_s) == (0.030, 0.040)
  assert cal.entry["dot big"] == 1.0  # the calibration keeps its own prices
  rounds = planner.MEASURE_ROUNDS * planner.ALONGSIDE_REFERENCE_ROUNDS
  assert timed.count("dp") == timed.count("fsdp") == planner.REFERENCE_WARMUP_ROUNDS + rounds
  # each round: the candidates, the reference steps, one pass of the probes
  one_round = ["a", "b"] + ["dp", "fsdp"] * planner.ALONGSIDE_REFERENCE_ROUNDS + ["probe"]
  assert timed[-planner.MEASURE_ROUNDS * len(one_round):] == one_round * planner.MEASURE_ROUNDS
  plan = planner.Plan(SimpleNamespace(chip=SimpleNamespace(name="cpu", memory=2 ** 30),
                                      num_devices=2, described=False, calibration=None),
                      [ma, mb], planner.model_shape(cfg, 256, "cpu"), speed)
  table = planner.format_table(plan)
  assert "step factor 1.710, 900 us per collective" in table and "est alongside ms" in table
  # with --json the same line goes to stderr, the JSON alone to stdout
  monkeypatch.setattr(plan_command, "make_plan", lambda *a, **k: plan)
  assert plan_command.main(["lmos plan", "--config=configs/gpt2_124m.py", "--measure",
                            "--json", "--no-calibrate"]) == 0
  out, err = capsys.readouterr()
  assert [r["predicted_alongside_step_s"] for r in json.loads(out)] == [
      ma.predicted_alongside_s, mb.predicted_alongside_s]
  assert "est alongside: prices probed and reference steps timed with the candidates: step "\
      "factor 1.710, 900 us per collective" in err.splitlines()


def test_a_cpu_peak_is_the_least_of_its_heap_readings(monkeypatch):
  """Without allocator statistics each candidate's peak is read from the heap in
  HEAP_PASSES passes taken in turns, and the least reading is kept: memory taken for
  something else while the steps run can only add to a reading."""
  readings = iter([7e6, 9e6,   # first pass: a, then b (candidates in memory order)
                   5e6, 30e6])  # second pass: b read high this time
  order = []

  def heap_peak(r, read):
    order.append(r.name)
    return next(readings)

  monkeypatch.setattr(planner, "_runner", lambda c, vocab, n, program=None: SimpleNamespace(
      name="a" if c.mesh.data == 2 else "b", build=SimpleNamespace(policy="fp32")))
  monkeypatch.setattr(planner, "_time_round", lambda r, steps: 0.01)
  monkeypatch.setattr(planner, "peak_bytes", lambda devices: None)
  monkeypatch.setattr(planner, "heap_in_use_reader", lambda: (lambda: 0))
  monkeypatch.setattr(planner, "heap_peak_per_device", heap_peak)
  from test_planner import tiny_cfg
  a = planner.Estimate(Layout(2, 1, 1, 1, "none"), 1e6, 0.05, 1e9, "compiled HLO")
  b = planner.Estimate(Layout(1, 2, 1, 1, "none"), 2e6, 0.06, 1e9, "compiled HLO")
  target = SimpleNamespace(num_devices=2, calibration=None)
  (ma, mb), _ = planner.measure_estimates(tiny_cfg(), 256, [a, b], target, steps=3)
  assert planner.HEAP_PASSES == 2 and order == ["a", "b", "a", "b"]
  assert (ma.measured_peak, mb.measured_peak) == (5e6, 9e6)


def test_candidates_and_reference_steps_are_probed_in_the_same_passes(tmp_path, monkeypatch):
  """A fresh calibration: one `probe_all` covers every dot of the compiled candidates and
  of the reference steps (so a slow spell cannot land on one side of the ratio a prediction
  takes), the reference steps are timed once and kept; with their speed kept, a second plan
  probes only what is new and times nothing."""
  from test_planner import tiny_cfg
  stand_in_probes(monkeypatch)
  calls = []
  real_probe_all = calibrate.Calibration.probe_all

  def recording_probe_all(self, dots=(), streams=(), matmuls=()):
    if dots:  # not the analytic ranking's matmul rates
      calls.append({d.key() for d in dots})
    real_probe_all(self, dots, streams, matmuls)

  monkeypatch.setattr(calibrate.Calibration, "probe_all", recording_probe_all)
  timed = []
  real_measure = planner.measure_reference
  monkeypatch.setattr(planner, "measure_reference",
                      lambda *a, **k: timed.append(1) or real_measure(*a, **k))
  cfg = tiny_cfg()
  cfg.train.precision = "fp32"
  cal = calibrate.load_calibration(jax.devices()[:2], tmp_path)
  target = planner.present_target(2, calibration=cal)
  plan = planner.make_plan(cfg, target, remats=("none",), max_microbatches=1, compile_top=2)
  assert plan.best.source.startswith("compiled HLO") and len(timed) == 1
  candidate_dots, reference_dots = set(), set()
  for e in plan.estimates[:2]:
    compiled = planner.compile_layout(cfg, 256, e.layout, target)[1]
    candidate_dots |= _dot_keys(compiled)
  for r in planner.reference_runners(2, "fp32", bool(cfg.model.scan_layers)):
    reference_dots |= _dot_keys(r.compiled)
  first = calls[0]
  assert candidate_dots <= first and reference_dots <= first
  assert reference_dots - candidate_dots  # the reference's own shapes were in those passes
  calls.clear()
  again = calibrate.load_calibration(jax.devices()[:2], tmp_path)
  planner.make_plan(cfg, planner.present_target(2, calibration=again), remats=("none",),
                    max_microbatches=1, compile_top=2)
  assert len(timed) == 1  # the reference speed was read back
  assert all(key in again.entry for call in calls for key in call)


def _dot_keys(compiled) -> set:
  return set(H.asked_prices([compiled.as_text()], 2).dots)
