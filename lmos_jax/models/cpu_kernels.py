"""The CPU quantized-matmul kernel (cpu_qmatmul.cc): built on first use, called through the FFI.

XLA:CPU converts int8 codes to float more slowly than float32 weights stream from memory,
so a weight-only quantized decode step written in jax.numpy is no faster than the dense
one. The C++ kernel converts the codes in registers next to the multiply-add and reads
only the codes and scales: decode at batch 1 runs at the speed the smaller weights allow.

It is compiled once per machine and source with the host's C++ compiler (`$CXX`, else
`g++`; `-O3 -march=native`, against the XLA FFI headers jaxlib ships) into
`$XDG_CACHE_HOME/lmos_jax/kernels/` (`~/.cache/...`), beside the compilation cache. Set
`LMOS_CPU_KERNELS=off` to use the jax.numpy path; without a compiler the jax.numpy path is
used and one warning says why. Both compute the same product (float32 accumulation in a
different order: the tests bound the difference).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from lmos_jax.parallel.compile_cache import user_cache_root
from lmos_jax.parallel.host_cpu import cpu_identity

ENV = "LMOS_CPU_KERNELS"
TARGET = "lmos_qmatmul_f32"
# Rows (tokens) up to which the kernel multiplies: a decode step's batch. Past 8 its sums
# leave L1 and a GPT-2 768x3072 kernel took 1.28 ms at 16 rows against XLA's 0.59 (int8) and
# 0.43 (float32); longer inputs (prefill, training) are compute bound, XLA's dot's work.
MAX_ROWS = 8
SOURCE = Path(__file__).with_name("cpu_qmatmul.cc")


def enabled(environ=None) -> bool:
  """False when LMOS_CPU_KERNELS is off/0/false/no."""
  env = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
  return env not in ("off", "0", "false", "no")


def kernel_dir(environ=None) -> Path:
  """Where built kernels are kept: beside the compilation cache, in lmos's user cache."""
  return user_cache_root(os.environ if environ is None else environ) / "kernels"


def build(compiler: str, out_dir: Path) -> Path:
  """Compiles the kernel into out_dir (atomically: concurrent builders cannot see a half
  written file) unless this source, jax and CPU already have a library there."""
  src = SOURCE.read_bytes()
  cpu = cpu_identity() or platform.processor() or platform.machine()
  key = hashlib.sha256(src + jax.__version__.encode() + cpu.encode()).hexdigest()
  lib = out_dir / f"qmatmul-{key[:16]}.so"
  if lib.exists():
    return lib
  out_dir.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
    tmp_lib = Path(tmp) / lib.name
    cmd = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
           f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(tmp_lib)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-500:]}")
    os.replace(tmp_lib, lib)
  return lib


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Builds (or finds), loads and registers the kernel once per process; False, with one
  warning naming the reason, when it cannot."""
  if not enabled():
    return False
  compiler = os.environ.get("CXX") or "g++"
  log = logging.getLogger("lmos_jax")
  if shutil.which(compiler) is None:
    log.warning("int8/int4 CPU kernel: no C++ compiler (%s; set CXX); quantized matmuls use "
                "jax.numpy, which on CPU decodes no faster than float32", compiler)
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(build(compiler, kernel_dir())))
  except (OSError, RuntimeError) as e:
    log.warning("int8/int4 CPU kernel not built (%s); quantized matmuls use jax.numpy", e)
    return False
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.LmosQMatmulF32), platform="cpu")
  return True


def applies(x_BI: jax.Array) -> bool:
  """Whether the kernel takes this product: float32 rows, a decode step's few, on a CPU
  host that has it (a GPU or TPU host never builds it). Decided while tracing, from static
  shapes."""
  return (x_BI.ndim == 2 and x_BI.shape[0] <= MAX_ROWS and x_BI.dtype == jnp.float32
          and jax.default_backend() == "cpu" and available())


def qmatmul_cpu(x_BI: jax.Array, q: jax.Array, scale_GO: jax.Array, bits: int) -> jax.Array:
  """x (B, I) @ dequantized codes -> (B, O) float32 by the C++ kernel (CPU only)."""
  if not available():
    raise RuntimeError(f"the CPU quantized-matmul kernel is off or could not be built ({ENV})")
  out = jax.ShapeDtypeStruct((x_BI.shape[0], q.shape[1]), jnp.float32)
  call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
  return call(x_BI, q, scale_GO.astype(jnp.float32), bits=bits)
