"""Plain autoregressive sampling by full recompute (no cache): the reference decoder.

The KV-cache decoder in `lmos_jax.inference.decode` must match this greedily, token for token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_tokens(graphdef, params, prompt_ids: np.ndarray, num_tokens: int, max_seq_len: int,
                  *, temperature: float = 1.0, seed: int = 0) -> np.ndarray:
  """Appends `num_tokens` sampled tokens to a 1-D prompt, sliding a max_seq_len window."""
  ids = list(np.asarray(prompt_ids, np.int32)) or [0]

  @jax.jit
  def next_logits(p, window, last):
    logits = nnx.merge(graphdef, p)(window[None, :])[0]
    return logits[last]

  key = jax.random.PRNGKey(seed)
  for _ in range(num_tokens):
    ctx = ids[-max_seq_len:]
    window = np.zeros((max_seq_len,), np.int32)
    window[: len(ctx)] = ctx
    logits = next_logits(params, jnp.asarray(window), len(ctx) - 1)
    key, sub = jax.random.split(key)
    if temperature <= 0:
      nxt = int(jnp.argmax(logits))
    else:
      nxt = int(jax.random.categorical(sub, logits / temperature))
    ids.append(nxt)
  return np.asarray(ids[len(prompt_ids) if len(prompt_ids) else 1:], np.int32)
