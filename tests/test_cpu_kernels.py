"""The C++ int8/int4 matmul for CPU decoding: equal to a float64 reference and to the
jax.numpy path, for every way it splits the work; taken only where it applies; switchable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmos_jax.models import cpu_kernels
from lmos_jax.models.quantized import pack_halves, qmatmul, qmatmul_xla

needs_kernel = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not cpu_kernels.available(),
    reason="the CPU kernel needs a CPU backend and a C++ compiler (CXX or g++)")


def problem(bits, rows, i, o, groups, seed=0):
  rng = np.random.default_rng(seed)
  lo, hi = (-8, 8) if bits == 4 else (-127, 128)
  codes = rng.integers(lo, hi, (i, o)).astype(np.int8)
  scale = (rng.random((groups, o)) * 0.01 + 1e-3).astype(np.float32)
  x = rng.standard_normal((rows, i)).astype(np.float32)
  q = np.asarray(pack_halves(jnp.asarray(codes))) if bits == 4 else codes
  w = (codes.reshape(groups, i // groups, o).astype(np.float64) * scale[:, None]).reshape(i, o)
  return x, q, scale, x.astype(np.float64) @ w, np.abs(x).astype(np.float64) @ np.abs(w)


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows,i,o,groups", [
    (1, 768, 2304, 1),   # rows split between threads (few outputs), per-channel scale
    (3, 512, 768, 8),    # the same with group scales
    (16, 64, 100, 2),    # 96 vector columns + 4 past the last 16 (scalar), 8 rows per pass
    (2, 36, 48, 1),      # 36 inputs: 4 code rows per pass (int8), 18 -> 1 (int4)
    (1, 32, 8200, 4),    # columns split between threads (a vocabulary-sized output)
    (5, 16, 7, 1),       # fewer than 16 outputs: scalar only
])
def test_kernel_equals_the_float64_reference_and_the_jnp_path(bits, rows, i, o, groups):
  x, q, scale, y_ref, mag = problem(bits, rows, i, o, groups)
  y = np.asarray(jax.jit(lambda *a: cpu_kernels.qmatmul_cpu(*a, bits))(x, q, scale))
  y_jnp = np.asarray(jax.jit(lambda *a: qmatmul_xla(*a, bits))(x, q, scale))
  # float32 sums of i terms in another order: within a few ulps of the sum of |terms|
  tol = 8 * np.finfo(np.float32).eps * mag + 1e-30
  assert y.shape == (rows, o) and np.all(np.abs(y - y_ref) <= tol)
  assert np.all(np.abs(y - y_jnp) <= 2 * tol)
  assert np.abs(y_ref).max() > 0.1


@needs_kernel
def test_qmatmul_takes_the_kernel_for_decode_rows_only():
  x, q, scale, _, _ = problem(8, cpu_kernels.MAX_ROWS, 64, 32, 1)
  hlo = lambda a: jax.jit(lambda *b: qmatmul(*b, 8)).lower(a, q, scale).as_text()  # noqa: E731
  assert cpu_kernels.TARGET in hlo(x)
  longer = np.concatenate([x, x[:1]])  # a prefill's many rows: XLA's own dot
  assert cpu_kernels.TARGET not in hlo(longer)
  assert cpu_kernels.TARGET not in hlo(x.astype(jnp.bfloat16))


def test_switch_and_cache_directory():
  assert cpu_kernels.enabled({}) and cpu_kernels.enabled({cpu_kernels.ENV: "on"})
  assert not any(cpu_kernels.enabled({cpu_kernels.ENV: v}) for v in ("off", "0", "False", "no"))
  got = cpu_kernels.kernel_dir({"XDG_CACHE_HOME": "/c", "HOME": "/h"})
  assert str(got) == "/c/lmos_jax/kernels"
  assert str(cpu_kernels.kernel_dir({"HOME": "/h"})) == "/h/.cache/lmos_jax/kernels"


@needs_kernel
def test_build_reuses_the_library_of_the_same_source(tmp_path):
  lib = cpu_kernels.build("g++", tmp_path)
  mtime = lib.stat().st_mtime_ns
  assert cpu_kernels.build("g++", tmp_path) == lib and lib.stat().st_mtime_ns == mtime
  assert [p.name for p in tmp_path.iterdir()] == [lib.name]  # no temporary left behind


def test_build_failure_names_the_command(tmp_path):
  with pytest.raises(RuntimeError, match="failed"):
    cpu_kernels.build("false", tmp_path)
