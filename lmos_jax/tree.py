"""Spelling a parameter's path: the one place that turns pytree and module paths into names.

Optimizer masks, PEFT targets, compression layouts, checkpoints and HF conversion all name
parameters; they must agree on the spelling, so every one of them goes through here.
"""

from __future__ import annotations

from typing import Any, Iterable


def path_names(path: Iterable[Any]) -> tuple[str, ...]:
  """Key path of a pytree leaf as plain strings ('blocks', '0', 'attn', 'query', 'kernel')."""
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return tuple(out)


def key_path(path: Iterable[Any]) -> tuple:
  """A jax key path as the plain keys of the nested dict (ints stay ints)."""
  return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def module_path(path: Iterable[Any]) -> str:
  """'blocks/attn/query' from an nnx module path or a tuple of names."""
  return "/".join(str(p) for p in path)


def path_str(path: Iterable[Any]) -> str:
  """'blocks/attn/query/kernel' from a jax key path: the spelling used in messages and files."""
  return module_path(path_names(path))
