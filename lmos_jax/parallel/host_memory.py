"""Host malloc for CPU-only training: the policy (keep freed memory in the process) and the
count of bytes in use, which stands in for the memory statistics XLA:CPU does not keep.

XLA:CPU allocates each step's temporaries afresh, and glibc hands every block over 32 MiB
back to the kernel when it is freed (per-thread arenas always do). For a model with large
activations that is gigabytes per device per step, page-faulted and zeroed again every step,
and it costs more the more memory other processes hold (experiments/bench_train.py and
experiments/README.md measure it). One malloc arena with no mmap and no trimming keeps freed
blocks for the next step. It costs lock traffic between XLA's threads, which only pays off
when a step's temporaries pass glibc's 32 MiB mmap cap, hence the `auto` rule below. Large
temporaries are the activations kept for the backward pass and, when every weight trains,
the gradients (a fresh buffer each step: a BERT vocabulary's embedding gradient alone is
47 MB, past glibc's mmap threshold).
"""

from __future__ import annotations

import ctypes
import gc
import importlib.metadata
import importlib.util
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from lmos_jax.config.schema import CHOICES as _CHOICES

CHOICES = _CHOICES["mesh.cpu_allocator"]


def activation_bytes_estimate(model_cfg: Any, seq_len: int, batch_size: int,
                              microbatches: int, devices: int) -> float:
  """Rough f32 bytes one device keeps for the backward pass (no remat), from the config.

  Per token and layer: LN inputs, q/k/v, attention output, residuals (~12 d), the MLP up
  projection and activation (2 d_ff) and the attention probabilities with their softmax
  (2 heads x seq_len). A scanned stack of several layers (`model.scan_layers`) counts twice:
  XLA's compiled step for configs/default.py holds 61 MiB of temporaries per device with its
  two layers scanned and 34 MiB unrolled, where the per-token count above gives 28 MiB; with
  one layer, 21 MiB scanned and 19 MiB unrolled, so a scan of one is not doubled. Only used
  to decide whether the temporaries are large.
  """
  d = model_cfg.d_model
  d_ff = model_cfg.d_ff or 4 * d
  tokens = batch_size * seq_len / max(microbatches, 1) / max(devices, 1)
  per_token_layer = 12 * d + 2 * d_ff + 2 * model_cfg.num_heads * seq_len
  scanned = 2 if model_cfg.get("scan_layers", False) and model_cfg.num_layers > 1 else 1
  return 4.0 * scanned * model_cfg.num_layers * tokens * per_token_layer


def gradient_bytes_estimate(model_cfg: Any, trains_all: bool) -> float:
  """Rough f32 bytes of one step's gradients: every weight's when all of them train (the
  embeddings of `model.vocab_size` rows and `model.max_seq_len` positions, and per layer
  the attention's 4 d^2 and the MLP's 2 d d_ff); 0 for PEFT, whose few trained weights
  leave the frozen ones without gradients. A vocabulary taken from the tokenizer
  (`model.vocab_size` 0) is not counted: it is not known before the data are read."""
  if not trains_all:
    return 0.0
  d = model_cfg.d_model
  d_ff = model_cfg.d_ff or 4 * d
  embed = (model_cfg.vocab_size + model_cfg.max_seq_len) * d
  return 4.0 * (embed + model_cfg.num_layers * (4 * d * d + 2 * d * d_ff))


def accelerator_plugin_installed() -> bool:
  """True when JAX could start a GPU/TPU backend here (checked without starting JAX)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return any(p.strip() not in ("", "cpu") for p in platforms.split(","))
  if importlib.util.find_spec("libtpu") is not None:
    return True
  return any(True for _ in importlib.metadata.entry_points(group="jax_plugins"))


def wants_retained_memory(mode: str, step_bytes: float, accelerator: bool,
                          threshold: float = 24 * 2**20) -> bool:
  """`retain` always, `system` never; `auto`: CPU-only hosts whose estimated per-device
  step temporaries (activations and gradients) reach `threshold`.

  glibc maps every block past 32 MiB (the cap of its mmap threshold) afresh and unmaps it
  when freed, so a step whose temporaries pass it page-faults them all again; below it they
  stay in malloc's arenas and the single arena only adds lock traffic (nanoGPT's
  4-layer/128d shape, 21 MiB: steps ~9% slower retained). The threshold sits under 32 MiB
  because the estimate leaves out the logits and norms (configs/default.py unrolled: 28 MiB
  estimated, 34 MiB compiled). Measured with `lmos train` on a 2-core host, steps retained
  against system malloc: configs/default.py 1.3-1.5x faster (1.6x with its layers scanned),
  bert_mlm.py 1.2-1.45x, movielens.py 1.4-1.9x, bert_sst2.py:lora 1.06-1.23x."""
  if mode not in CHOICES:
    raise ValueError(f"mesh.cpu_allocator={mode!r}: choose one of {', '.join(CHOICES)}")
  if mode != "auto":
    return mode == "retain"
  return not accelerator and step_bytes >= threshold


def glibc() -> ctypes.CDLL | None:
  """The process's C library when it is glibc (Linux), else None: musl and others keep
  their allocator untouched and unread."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version
  except (OSError, AttributeError):
    return None
  return libc


class _MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in (
      "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
      "fordblks", "keepcost")]


def heap_in_use_reader() -> Callable[[], int] | None:
  """A function returning the bytes this process holds from malloc (glibc's `mallinfo2`:
  chunks in use in its arenas plus the blocks it mapped), or None where that count is not
  the process's: no glibc 2.33+, or another allocator preloaded in front of it (checked by
  watching an 8 MiB block appear in the count).

  Why: XLA:CPU's devices keep no allocator statistics (`memory_stats()` is None), but every
  buffer they hold (arguments, outputs, a step's temporaries) comes from malloc, so the
  heap's growth is what the devices held. The resident set is no stand-in: it keeps what
  malloc retained and counts compile-time memory and page-cache effects."""
  libc = glibc()
  if libc is None or not hasattr(libc, "mallinfo2"):
    return None
  mallinfo2 = libc.mallinfo2
  mallinfo2.restype = _MallInfo2

  def in_use() -> int:
    m = mallinfo2()
    return int(m.uordblks + m.hblkhd)

  return in_use if any(_count_sees_block(in_use) for _ in range(3)) else None


def _count_sees_block(in_use: Callable[[], int], size: int = 8 << 20) -> bool:
  """Whether a `size` block shows in the count (half of it is enough: other threads may
  free memory meanwhile; a count that is not this process's malloc shows nothing)."""
  before = in_use()
  block = bytearray(size)
  seen = in_use() - before
  del block
  return seen >= size // 2


class HeapPeak:
  """`with HeapPeak(read) as h:` samples `read()` (bytes in use) from a thread every
  `interval` seconds while the block runs; `h.grown` is the largest reading above the one
  taken on entry.

  Sampling is enough for XLA:CPU: a step's temporaries are allocated when the step starts
  and freed when it ends, so they stay in use for the whole step. But while the step's
  threads keep every core busy the sampler runs only every 5-20 ms (measured on 2 cores),
  so a caller runs steps until `samples` says enough readings were taken. Reading takes
  malloc's locks: measure in rounds that are not timed."""

  def __init__(self, read: Callable[[], int], interval: float = 5e-4):
    self._read, self._interval = read, interval
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True, name="lmos-heap-peak")
    self.base = self.peak = 0
    self.samples = 0

  def _sample(self) -> None:
    while not self._stop.wait(self._interval):
      self.peak = max(self.peak, self._read())
      self.samples += 1

  def __enter__(self) -> "HeapPeak":
    gc.collect()  # garbage of earlier work would otherwise be freed inside the block
    self.base = self.peak = self._read()
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self._read())

  @property
  def grown(self) -> int:
    return self.peak - self.base


def retain_freed_memory() -> bool:
  """glibc only: one arena (M_ARENA_MAX=1), no mmap (M_MMAP_MAX=0), never trim
  (M_TRIM_THRESHOLD=-1). Fully effective only before JAX starts its threads, since a thread
  keeps the arena it first allocated from. Returns False where there is no glibc mallopt."""
  libc = glibc()
  if libc is None:
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  settings = ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, -1))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)


def setup_cpu_allocator(cfg: Any, devices: int) -> bool:
  """Applies `mesh.cpu_allocator` for a run on `devices` devices; True when retained."""
  est = activation_bytes_estimate(cfg.model, cfg.data.seq_len, cfg.train.batch_size,
                                  cfg.train.microbatches, devices)
  est += gradient_bytes_estimate(cfg.model, cfg.peft.method == "full")
  mode = cfg.mesh.get("cpu_allocator", "auto")
  if not wants_retained_memory(mode, est, accelerator_plugin_installed()):
    return False
  return retain_freed_memory()
