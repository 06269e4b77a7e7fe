"""Applications built on a finetuned model (read through lmos_jax.inference and lmos_jax.workdir)."""
