"""The planner's per-machine calibration (lmos_jax.train.calibrate): probes give sane numbers,
each is measured once per machine and read back after, and the step-time model uses them."""

import math

import jax
import pytest

from lmos_jax.train import calibrate
from lmos_jax.train import plan as planner
from lmos_jax.train.plan import Layout


def test_each_number_is_probed_once_then_read_back(tmp_path, monkeypatch):
  calls = []

  def fake(name, value):
    def probe(*args, **kwargs):
      calls.append(name)
      return value
    return probe

  monkeypatch.setattr(calibrate, "probe_allreduce", fake("allreduce", 2e9))
  monkeypatch.setattr(calibrate, "probe_op", fake("op", 3e-6))
  monkeypatch.setattr(calibrate, "probe_dispatch", fake("dispatch", 4e-5))
  monkeypatch.setattr(calibrate, "probe_matmul", fake("matmul", 5e10))
  two = jax.devices()[:2]
  cal = calibrate.load_calibration(two, tmp_path)
  assert not cal.read_back
  got = (cal.allreduce_bw, cal.op_s, cal.dispatch_s, cal.matmul_rate(64, 32, 128))
  assert got == (2e9, 3e-6, 4e-5, 5e10)
  cal.matmul_rate(64, 32, 128)  # asked again in the same process: no new probe
  assert sorted(calls) == ["allreduce", "dispatch", "matmul", "op"]
  again = calibrate.load_calibration(two, tmp_path)
  assert again.read_back and "read from" in again.describe()
  assert (again.allreduce_bw, again.op_s, again.dispatch_s,
          again.matmul_rate(64, 32, 128)) == got
  assert len(calls) == 4  # nothing probed again
  again.matmul_rate(64, 32, 256)  # a new shape is probed and kept beside the others
  assert calls[-1] == "matmul" and len(calibrate.read_machine_file(cal.path)) == 1
  other = calibrate.load_calibration(jax.devices()[:4], tmp_path)  # other devices: afresh
  assert not other.read_back and other.key != cal.key
  other.op_s
  assert len(calibrate.read_machine_file(cal.path)) == 2 and calls[-1] == "op"


def test_no_cache_directory_probes_and_keeps_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(calibrate, "probe_op", lambda devices: 1e-6)
  cal = calibrate.load_calibration(jax.devices()[:2], None)
  assert cal.op_s == 1e-6 and cal.path is None and "not kept" in cal.describe()


def test_probes_measure_plausible_numbers():
  """Real probes on 2 of the simulated devices: finite positive rates, a per-op cost far
  below a millisecond, and no bandwidth at all to measure on one device."""
  two = jax.devices()[:2]
  rate = calibrate.probe_matmul(two, 64, 64, 64)
  assert 1e6 < rate < 1e15
  assert 0 < calibrate.probe_allreduce(two, nbytes=1 << 16) < math.inf
  assert calibrate.probe_allreduce(jax.devices()[:1]) == math.inf
  assert 0 < calibrate.probe_op(two) < 1e-3
  assert 0 < calibrate.probe_dispatch(two) < 0.1


def test_temporaries_fault_each_call_only_past_the_mmap_cap():
  """glibc maps a block past its mmap cap anew at every call: all of it faults; a smaller
  block stays in malloc's arenas between calls."""
  cap = calibrate.MMAP_CAP_BYTES
  assert calibrate.first_touch_bytes(cap - 1) == 0.0
  assert calibrate.first_touch_bytes(cap) == cap
  assert calibrate.first_touch_bytes(3 * cap) == 3 * cap


def test_the_first_touch_probe_compares_a_fresh_output_with_a_donated_one(monkeypatch):
  """Fresh-output seconds less overwrite-in-place seconds, per byte; the in-place calls
  write over their donated input, so their output stays where it was (nothing is mapped
  for it)."""
  pointers = []

  def timed(fn, *args, **kwargs):  # stands in for the timer: two calls, their buffers
    pointers.append([fn(*args).unsafe_buffer_pointer() for _ in range(2)])
    return [0.030, 0.010][len(pointers) - 1]

  monkeypatch.setattr(calibrate, "FIRST_TOUCH_BYTES", 1 << 20)
  monkeypatch.setattr(calibrate, "_median_seconds", timed)
  got = calibrate.probe_first_touch(jax.devices()[:1])
  assert got == pytest.approx(0.020 / (1 << 20))
  _, (first, second) = pointers
  assert first == second  # donated: written in place


class StubCalibration:
  """Fixed speeds; records the matmul shapes the model asks for."""

  def __init__(self, rate=1e9, bw=math.inf, op_s=0.0, dispatch_s=0.0):
    self.rate, self.allreduce_bw, self.op_s, self.dispatch_s = rate, bw, op_s, dispatch_s
    self.asked = []

  def matmul_rate(self, m, k, n, dtype):
    self.asked.append((m, k, n))
    return self.rate


def shape(**kw):
  base = dict(num_layers=4, d_model=128, d_ff=512, num_heads=4, kv_heads=4, vocab=65,
              seq_len=64, batch=16, params=800_000, flops_per_token=5e6, param_bytes=4,
              compute_bytes=4)
  return planner.ModelShape(**{**base, **kw})


def test_calibrated_step_time_is_flops_at_the_probed_rate_plus_ops_and_comm():
  s = shape()
  cal = StubCalibration(rate=2e9)
  target = planner.Target(planner.CHIPS["h200"], 4, described=False, calibration=cal)
  lay = Layout(data=2, fsdp=1, tensor=2, microbatches=2, remat="none")
  # the rate is asked at one device's microbatch: 16 x 64 tokens / (2 data x 2 micro), and
  # the MLP width split over the 2 tensor devices
  assert planner.step_time(s, lay, target, 3e9) == pytest.approx(
      3e9 / 2e9 + tensor_and_data_bytes(s, lay) / math.inf)
  assert cal.asked == [(256, 128, 256)]
  slow = StubCalibration(rate=2e9, bw=1e9, op_s=1e-5, dispatch_s=1e-3)
  target = planner.Target(planner.CHIPS["h200"], 4, described=False, calibration=slow)
  ops = 2 * 4 * planner.OPS_PER_LAYER * 1e-5  # microbatches x layers x ops per layer
  want = 3e9 / 2e9 + tensor_and_data_bytes(s, lay) / 1e9 + ops + 1e-3
  assert planner.step_time(s, lay, target, 3e9) == pytest.approx(want)


def tensor_and_data_bytes(s, lay) -> float:
  """The planner's bytes moved by collectives for a data x tensor layout (no fsdp)."""
  k, d, t, cb = lay.microbatches, lay.data, lay.tensor, s.compute_bytes
  tokens = s.batch * s.seq_len / (d * k)
  grads = k * 2 * (d - 1) / d * s.params / t * cb
  megatron = k * s.num_layers * 4 * 2 * (t - 1) / t * tokens * s.d_model * cb
  return grads + megatron


def test_the_analytic_ranking_probes_every_layouts_matmul_in_the_same_passes(tmp_path,
                                                                             monkeypatch):
  """Layouts with the same FLOPs differ in the analytic model only through the probed rate
  of their MLP matmul, so every rate the ranking reads is probed in one `probe_all` (passes
  over all of them, not one shape after another as each layout is estimated)."""
  from test_planner import tiny_cfg
  batches = []

  def recording_probe_all(self, dots=(), streams=(), matmuls=()):
    batches.append(list(matmuls))
    for shape in matmuls:  # each kept at a stand-in rate, as the passes would keep it
      self.entry[self._matmul_probe(*shape)[0]] = 1e9

  monkeypatch.setattr(calibrate.Calibration, "probe_all", recording_probe_all)
  monkeypatch.setattr(calibrate, "probe_matmul", lambda *a: pytest.fail("probed alone"))
  monkeypatch.setattr(calibrate, "probe_allreduce", lambda d: 1e9)
  monkeypatch.setattr(calibrate, "probe_op", lambda d: 1e-6)
  monkeypatch.setattr(calibrate, "probe_dispatch", lambda d: 1e-5)
  cal = calibrate.load_calibration(jax.devices()[:4], tmp_path)
  cfg = tiny_cfg()
  target = planner.present_target(4, calibration=cal)
  plan = planner.make_plan(cfg, target, remats=("none",), max_microbatches=2, compile_top=0)
  s = planner.model_shape(cfg, planner.vocab_of(cfg), "cpu")
  asked = {planner.mlp_matmul(s, e.layout) for e in plan.estimates}
  assert len(batches) == 1 and set(batches[0]) == asked and len(asked) > 2
