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

Arrays inside the package carry their shape in their name (`x_BTD`: batch, positions,
width), one capital per axis, with this one legend:

  B  batch rows (sequences, users' histories, questions)
  T  positions of a sequence: tokens, or the items of a user's history
  S  key positions: the KV cache's slots; the text slots of a packed batch
  D  model width          F  MLP width, or an item text's embedding width
  V  vocabulary           H  width of one attention head (half a kernel's inputs, for int4)
  N  query heads in attention; elsewhere the rows of a table (items, documents, kernel
     output units, texts)
  K  key/value heads in attention; the verify positions of speculative decoding; the k of
     a top-k search; a clustering's centres
  L  layers (a stacked leading axis)
  P  prompt positions; processes, in multi-host checks
  E  the stop (end) token ids of a generation
  U  users                Q  queries (retrieval)       C  classes or topics
  R, W  rows and width of a packed batch
  I, O  a kernel's inputs and outputs; G groups of g inputs that share a scale; X the ids
        an embedding lookup takes from a kernel's outputs
"""

__version__ = "0.1.0"


def __getattr__(name: str):
  """Lazy top-level API: `lmos_jax.load_hf` imports jax/flax only when first used."""
  if name == "load_hf":
    from lmos_jax.models.hf import load_hf
    return load_hf
  raise AttributeError(f"module 'lmos_jax' has no attribute {name!r}")
