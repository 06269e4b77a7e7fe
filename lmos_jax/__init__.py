__version__ = "0.1.0"


def __getattr__(name: str):
  """Lazy top-level API: `lmos_jax.load_hf` imports jax/flax only when first used."""
  if name == "load_hf":
    from lmos_jax.models.hf import load_hf
    return load_hf
  raise AttributeError(f"module 'lmos_jax' has no attribute {name!r}")
