"""lmos_jax: an operating system for language models in JAX.

The package is layered; a module imports only from its own layer or the layers listed
before it (tests/test_layering.py parses every import and fails on one that points up).
Bottom to top:

  errors      UserError: bad input that `lmos` reports as one line, exit 2
  tree        how a parameter's path is spelled
  config      the schema, the allowed choices, loading and validating a config
  data        tokenizers, sources, batching and the data-stream state
  parallel    meshes, the logical-axis rules, hosts and processes
  models      GPT and BERT blocks, the KV-cache decoder, the Hugging Face format
  peft        LoRA, adapters and AdaLoRA as module surgery
  compress    quantization, pruning masks, layer trimming, distillation losses
  workdir     the run directory: what a run writes and how it is read back
  train       optimizer, step, loop, checkpoints, planning
  inference   generate, predict and the compression report
  apps        applications on a finetuned model: opinion monitoring, customer-service
              answers and retrieval
  serve       `lmos serve`: the HTTP server
  convert     `lmos convert`: workdirs to and from Hugging Face folders
  cli         the `lmos` command
"""

__version__ = "0.1.0"


def __getattr__(name: str):
  """Lazy top-level API: `lmos_jax.load_hf` imports jax/flax only when first used."""
  if name == "load_hf":
    from lmos_jax.models.hf import load_hf
    return load_hf
  raise AttributeError(f"module 'lmos_jax' has no attribute {name!r}")
