"""Where JAX's persistent compilation cache goes (train.compile_cache, LMOS_COMPILE_CACHE),
that it is really written to and switched off, and that a program compiled ahead in a
background thread is the one its first call runs; test_cli shows a second `lmos train` of
the same config compiling nothing."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmos_jax.parallel.compile_cache import ENV, CompileAhead, cache_dir, enable_compile_cache


@pytest.mark.parametrize("setting,environ,want", [
    ("auto", {"HOME": "/home/u"}, ("/home/u/.cache/lmos_jax/jax", "per-user default")),
    ("auto", {"HOME": "/home/u", "XDG_CACHE_HOME": "/x"}, ("/x/lmos_jax/jax", "per-user default")),
    ("auto", {"HOME": "/home/u", ENV: "/fast/cache"}, ("/fast/cache", ENV)),
    ("auto", {"HOME": "/home/u", ENV: "off"}, (None, f"{ENV}=off")),
    ("off", {ENV: "/fast/cache"}, (None, "train.compile_cache=off")),
    ("/mine", {ENV: "/fast/cache"}, ("/mine", "train.compile_cache")),
])
def test_cache_dir_order(setting, environ, want):
  path, why = cache_dir(setting, environ)
  assert (path and str(path), why) == want


@pytest.fixture
def restore_cache():
  yield
  enable_compile_cache("auto")  # back to conftest's per-run cache


def _compile_new_program(scale: float) -> None:
  jax.jit(lambda x: jnp.tanh(x) * scale + 1.0)(jnp.ones((3,))).block_until_ready()


def test_enabled_cache_is_written_and_off_is_off(tmp_path, restore_cache):
  line = enable_compile_cache(str(tmp_path / "c"))
  assert line == f"compile cache {tmp_path / 'c'} (train.compile_cache)"
  _compile_new_program(1.25)
  written = list((tmp_path / "c").iterdir())
  assert written, "a compiled program must land in the cache"
  assert enable_compile_cache("off") == "compile cache off (train.compile_cache=off)"
  assert jax.config.jax_compilation_cache_dir is None
  _compile_new_program(2.5)
  assert list((tmp_path / "c").iterdir()) == written


def test_unusable_directory_is_said_and_training_goes_on(tmp_path, restore_cache):
  blocker = tmp_path / "file"
  blocker.write_text("")
  line = enable_compile_cache(str(blocker / "cache"))
  assert line.startswith(f"compile cache off: cannot create {blocker / 'cache'}") and ENV in line
  assert jax.config.jax_compilation_cache_dir is None


def test_host_peak_is_measured_once_per_machine_key(tmp_path, monkeypatch):
  """The CPU matmul peak is probed once, read back from the cache directory after, probed
  again for another device split or a damaged file, and every time without a cache."""
  from lmos_jax.train import metrics
  probes = []

  def probe(n=1024, iters=4, repeats=3, bf16=False):
    probes.append(n)
    return 100.0 + len(probes) + (1000.0 if bf16 else 0.0)
  monkeypatch.setattr(metrics, "measure_cpu_peak", probe)
  devs = jax.devices()
  first, src1 = metrics.device_peak_flops(devs, cache_dir=str(tmp_path))
  again, src2 = metrics.device_peak_flops(devs, cache_dir=str(tmp_path))
  assert (first, again, len(probes)) == (101.0, 101.0, 1)
  assert "kept in" in src1 and "read from" in src2
  other, _ = metrics.device_peak_flops(devs[:1], cache_dir=str(tmp_path))
  assert (other, len(probes)) == (102.0, 2)  # one device is another key
  assert metrics.device_peak_flops(devs, cache_dir=str(tmp_path))[0] == 101.0
  # a bf16 run's peak is its own probe, kept beside the f32 one of the same machine
  bf16, src = metrics.device_peak_flops(devs, cache_dir=str(tmp_path), bf16=True)
  assert (bf16, len(probes)) == (1103.0, 3) and "bf16 matmul probe" in src
  assert metrics.device_peak_flops(devs, cache_dir=str(tmp_path), bf16=True)[0] == 1103.0
  assert metrics.device_peak_flops(devs, cache_dir=str(tmp_path))[0] == 101.0
  assert len(probes) == 3
  (tmp_path / metrics.PEAK_FILE).write_text("{not json")
  assert metrics.device_peak_flops(devs, cache_dir=str(tmp_path))[0] == 104.0
  assert metrics.device_peak_flops(devs, cache_dir=None)[0] == 105.0
  assert metrics.device_peak_flops(devs, cache_dir=None)[0] == 106.0


def test_compile_ahead_leaves_the_first_call_nothing_to_compile():
  """The program compiled in the background thread is the one the call runs: XLA's compile
  step (which a persistent-cache read also passes through) happens once, before the call."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((1,), ("data",))
  sh = NamedSharding(mesh, P())

  def ahead_program(x, y):
    return jnp.tanh(x @ y) + 1.0
  f = jax.jit(ahead_program, in_shardings=(sh, sh), out_shardings=sh)
  x = jax.device_put(jnp.arange(12.0).reshape(3, 4) / 10, sh)
  y = jax.device_put(jnp.ones((4, 3)), sh)
  compiled = []

  def listen(event, secs, **kw):
    if event == "/jax/core/compile/backend_compile_duration" and "ahead_program" in str(
        kw.get("fun_name")):
      compiled.append(secs)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    ahead = CompileAhead(f, (jax.ShapeDtypeStruct((3, 4), jnp.float32, sharding=sh),
                             jax.ShapeDtypeStruct((4, 3), jnp.float32, sharding=sh)), mesh)
    ahead.wait()
    assert len(compiled) == 1
    with jax.set_mesh(mesh):
      out = f(x, y)
    assert len(compiled) == 1, "the call compiled its program again"
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  want = np.tanh(np.asarray(x) @ np.asarray(y)) + 1.0
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-6)


def test_compile_ahead_raises_the_compile_error_in_the_caller():
  class Lowered:
    def compile(self):
      raise ValueError("no such kernel")

  class Jitted:
    def lower(self, *specs):
      return Lowered()
  ahead = CompileAhead(Jitted(), (), jax.make_mesh((1,), ("data",)))
  with pytest.raises(ValueError, match="no such kernel"):
    ahead.wait()
