"""Where JAX's persistent compilation cache goes (train.compile_cache, LMOS_COMPILE_CACHE), and
that it is really written to and switched off; test_cli shows a second `lmos train` of the
same config compiling nothing."""


import jax
import jax.numpy as jnp
import pytest

from lmos_jax.parallel.compile_cache import ENV, cache_dir, enable_compile_cache


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

  def probe(n=1024, iters=4, repeats=3):
    probes.append(n)
    return 100.0 + len(probes)
  monkeypatch.setattr(metrics, "measure_cpu_peak", probe)
  devs = jax.devices()
  first, src1 = metrics.device_peak_flops(devs, cache_dir=str(tmp_path))
  again, src2 = metrics.device_peak_flops(devs, cache_dir=str(tmp_path))
  assert (first, again, len(probes)) == (101.0, 101.0, 1)
  assert "kept in" in src1 and "read from" in src2
  other, _ = metrics.device_peak_flops(devs[:1], cache_dir=str(tmp_path))
  assert (other, len(probes)) == (102.0, 2)  # one device is another key
  assert metrics.device_peak_flops(devs, cache_dir=str(tmp_path))[0] == 101.0
  (tmp_path / metrics.PEAK_FILE).write_text("{not json")
  assert metrics.device_peak_flops(devs, cache_dir=str(tmp_path))[0] == 103.0
  assert metrics.device_peak_flops(devs, cache_dir=None)[0] == 104.0
  assert metrics.device_peak_flops(devs, cache_dir=None)[0] == 105.0
