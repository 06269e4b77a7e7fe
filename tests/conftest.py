"""Eight simulated CPU devices for every test; must run before jax is imported.

The tests compile with XLA's backend (LLVM) optimizations off: their programs are tiny and run
in milliseconds, while optimizing them took most of the suite's time (about 2x on 2 cores).
The HLO-level passes (fusion, sharding, layout) still run, and floating-point semantics do not
depend on the LLVM level (XLA's CPU fast-math is off either way). Subprocesses the tests start
inherit the flags through the environment. Speed is measured in experiments/, never here.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
