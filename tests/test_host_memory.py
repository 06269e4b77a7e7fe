"""mesh.cpu_allocator: keep freed host memory so XLA:CPU's per-step temporaries aren't
page-faulted again each step; and the malloc count that measures XLA:CPU's peak memory
(lmos_jax/parallel/host_memory.py)."""

import subprocess
import sys
import threading
import time

import numpy as np

import pytest

from lmos_jax.config.loading import ConfigError, check_cpu_devices
from lmos_jax.config.schema import base_config
from lmos_jax.parallel.host_memory import (HeapPeak, activation_bytes_estimate,
                                           gradient_bytes_estimate, heap_in_use_reader,
                                           wants_retained_memory)

MiB = 2**20


def _model(layers, heads, d, scan=False):
  m = base_config().model
  m.num_layers, m.num_heads, m.d_model, m.scan_layers = layers, heads, d, scan
  return m


def test_estimate_separates_nanogpt_shapes():
  """4L/128d/T64/B12 keeps ~20 MiB per device, 6L/384d/T256/B64 ~1.8 GiB (2 devices, layers
  unrolled as configs/shakespeare_char.py has them): the small one under the rule, the baby
  one far over it."""
  small = activation_bytes_estimate(_model(4, 4, 128), 64, 12, 1, 2)
  baby = activation_bytes_estimate(_model(6, 6, 384), 256, 64, 1, 2)
  assert 16 * MiB < small < 24 * MiB
  assert not wants_retained_memory("auto", small, False)
  assert 1024 * MiB < baby < 4096 * MiB
  # microbatches and devices divide the tokens each device holds at once (float64 products of
  # integers below 2^53 and divisions by 2 and 4: exact; approx's rel 1e-6 spares the order)
  assert activation_bytes_estimate(_model(6, 6, 384), 256, 64, 4, 2) == pytest.approx(baby / 4)


def test_a_scanned_layer_stack_counts_twice():
  """configs/default.py's shape (2 layers, 128 wide, 16 x 128 tokens on 2 devices): its
  compiled step holds 61 MiB of temporaries per device scanned, 34 MiB unrolled; both are
  past glibc's 32 MiB mmap cap, and the rule retains either."""
  unrolled = activation_bytes_estimate(_model(2, 4, 128), 128, 16, 1, 2)
  scanned = activation_bytes_estimate(_model(2, 4, 128, scan=True), 128, 16, 1, 2)
  assert scanned == 2 * unrolled
  assert wants_retained_memory("auto", unrolled, False)
  one_layer = activation_bytes_estimate(_model(1, 4, 128, scan=True), 128, 16, 1, 2)
  # a scan of one layer holds about what the layer unrolled does (21 and 19 MiB compiled)
  assert one_layer == unrolled / 2


def test_gradients_count_when_every_weight_trains():
  """MiniLM-L6 (30,522 x 384 embeddings, 6 layers, d_ff 1536) trained in full makes ~86 MiB
  of gradients a step, which tips a batch of 4 x 16 tokens (~12 MiB of activations) over the
  rule; LoRA leaves the frozen weights without gradients."""
  m = _model(6, 12, 384)
  m.vocab_size, m.max_seq_len, m.d_ff = 30522, 512, 1536
  grads = gradient_bytes_estimate(m, trains_all=True)
  params = (30522 + 512) * 384 + 6 * (4 * 384**2 + 2 * 384 * 1536)
  assert grads == 4 * params
  assert 80 * MiB < grads < 90 * MiB
  assert gradient_bytes_estimate(m, trains_all=False) == 0.0
  acts = activation_bytes_estimate(m, 16, 4, 1, 1)
  assert not wants_retained_memory("auto", acts, False)
  assert wants_retained_memory("auto", acts + grads, False)


@pytest.mark.parametrize("mode,est,accel,want", [
    ("auto", 2048 * MiB, False, True),  # large temporaries on a CPU-only host
    ("auto", 20 * MiB, False, False),  # small: the arena lock would cost more
    ("auto", 28 * MiB, False, True),  # near glibc's 32 MiB mmap cap: retained
    ("auto", 2048 * MiB, True, False),  # a GPU/TPU host: host malloc left alone
    ("retain", 1 * MiB, True, True),
    ("system", 8192 * MiB, False, False),
])
def test_policy(mode, est, accel, want):
  assert wants_retained_memory(mode, est, accel) is want


def test_bad_choice_names_the_field():
  cfg = base_config()
  cfg.mesh.cpu_allocator = "jemalloc"
  with pytest.raises(ConfigError, match="mesh.cpu_allocator"):
    check_cpu_devices(cfg)


FAULTS = """
import ctypes, resource, sys
from lmos_jax.parallel.host_memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def faults_of_one_step():
  # a 64 MiB temporary, written then freed, like XLA's step buffer (not numpy: it would
  # madvise huge pages, which XLA does not)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(64 * 2**20)
  ctypes.memset(p, 1, 64 * 2**20)
  libc.free(p)
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_step()
print(applied, faults_of_one_step())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_retained_memory_is_not_faulted_again():
  """With the default malloc each 64 MiB temporary is mapped and zeroed anew (16k page
  faults); retained, the second one reuses the first's pages."""
  out = {}
  for mode in ("system", "retain"):
    res = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                         check=True)
    applied, faults = res.stdout.split()
    out[mode] = (applied == "True", int(faults))
  assert out["system"][1] > 8000, out
  # page-fault counts: a fresh 64 MiB mapping costs 16384; reused pages leave only the
  # interpreter's own incidental faults, well under 1000
  assert out["retain"] == (True, pytest.approx(0, abs=1000)), out


def test_heap_count_sees_a_block_and_the_peak_of_one_freed_in_another_thread():
  """The count grows by a 64 MiB array and falls back when it is freed; a 32 MiB block that a
  worker holds for 50 ms and frees inside the window is the window's peak (what a step's
  temporaries are). Within 1 MiB: other threads of the test process (pytest's, the suite's
  background threads) allocate and free meanwhile."""
  read = heap_in_use_reader()
  if read is None:
    pytest.skip("malloc's count is glibc's (Linux)")
  before = read()
  block = np.ones(16 * MiB, np.float32)
  assert 63 * MiB < read() - before < 65 * MiB
  del block
  assert read() - before < MiB

  def hold():
    temp = np.ones(8 * MiB, np.float32)
    time.sleep(0.05)
    del temp

  with HeapPeak(read) as heap:
    worker = threading.Thread(target=hold)
    worker.start()
    worker.join()
  assert heap.samples > 0
  assert 31 * MiB < heap.grown < 33 * MiB
