"""Eight simulated CPU devices for every test; must run before jax is imported.

The tests compile with XLA's backend (LLVM) optimizations off: their programs are tiny and run
in milliseconds, while optimizing them took most of the suite's time (about 2x on 2 cores).
The HLO-level passes (fusion, sharding, layout) still run, and floating-point semantics do not
depend on the LLVM level (XLA's CPU fast-math is off either way). Subprocesses the tests start
inherit the flags through the environment. Speed is measured in experiments/, never here.

One persistent compilation cache (`LMOS_COMPILE_CACHE`), made fresh for each pytest run and
shared by its workers and the `lmos` processes tests start, so a program several tests compile
is compiled once; it never touches the user's own cache.
"""

import os
import shutil
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "PYTEST_XDIST_WORKER" not in os.environ:  # the controller (or a plain run) makes it
  os.environ["LMOS_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="lmos-test-compile-cache-")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")

from lmos_jax.parallel.compile_cache import enable_compile_cache  # noqa: E402

enable_compile_cache("auto")  # in-process compiles too: LMOS_COMPILE_CACHE above


def pytest_unconfigure(config):
  if "PYTEST_XDIST_WORKER" not in os.environ:  # workers are done: drop the run's cache
    shutil.rmtree(os.environ["LMOS_COMPILE_CACHE"], ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
  """A small random BERT encoder as a Hugging Face folder (positions 32, weights drawn at the
  models' own init_std), with MiniLM's tokenizer."""
  from helpers import tiny_bert_hf_dir
  from lmos_jax.config.schema import base_config
  return str(tiny_bert_hf_dir(tmp_path_factory.mktemp("tiny_bert"), max_seq_len=32,
                              init_std=base_config().model.init_std))
