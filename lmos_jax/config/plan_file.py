"""`WORKDIR/plan.json`: what `lmos plan --write` and `lmos tune --write` decided, as config
overrides, and how `lmos train --config.plan=FILE` applies them.

The file is one JSON object of dotted config keys, `{"train.lr": 0.0029, "mesh.fsdp": 2}`,
plus a "_sources" entry saying which command wrote which key. Both commands merge into the
same file, so a plan (layout) and a tune (LR, batch size) compose. Applied values replace
the config file's and the command line's; training logs one line per applied value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmos_jax.config.loading import ConfigError

PLAN_FILE = "plan.json"
SOURCES = "_sources"


def write_plan(workdir: str | Path, overrides: dict[str, Any], source: str) -> Path:
  """Merges `overrides` into WORKDIR/plan.json (creating the workdir), noting `source`."""
  wd = Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  path = wd / PLAN_FILE
  plan = read_plan(path) if path.is_file() else {}
  sources = plan.pop(SOURCES, {})
  plan.update(overrides)
  sources.update({k: source for k in overrides})
  path.write_text(json.dumps({**plan, SOURCES: sources}, indent=2, sort_keys=True) + "\n")
  return path


def read_plan(path: str | Path) -> dict[str, Any]:
  """The overrides of a plan file; a missing or malformed file is a ConfigError."""
  p = Path(path)
  try:
    plan = json.loads(p.read_text())
  except FileNotFoundError:
    raise ConfigError(f"config 'plan'={str(path)!r}: no such file; write one with `lmos plan "
                      "--write WORKDIR` or `lmos tune --write WORKDIR`") from None
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"config 'plan'={str(path)!r}: not a readable JSON object ({e})") from None
  if not isinstance(plan, dict):
    raise ConfigError(f"config 'plan'={str(path)!r}: expected a JSON object of dotted config "
                      "keys")
  return plan


def apply_plan(cfg) -> list[str]:
  """Applies `cfg.plan` (if set) to `cfg` in place; one description per applied value."""
  path = str(cfg.get("plan", "") or "")
  if not path:
    return []
  plan = read_plan(path)
  sources = plan.pop(SOURCES, {})
  lines = []
  for key, value in plan.items():
    block, _, field = key.rpartition(".")
    node = cfg
    try:
      for part in block.split(".") if block else ():
        node = node[part]
      old = node[field]
    except (KeyError, AttributeError, TypeError):
      raise ConfigError(f"config 'plan'={path!r}: {key!r} is not a config key") from None
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if type(value) is not type(old):
      raise ConfigError(f"config 'plan'={path!r}: {key}={value!r} has type "
                        f"{type(value).__name__}; the config's is {type(old).__name__}")
    node[field] = value
    lines.append(f"{key}={value!r} (was {old!r}; from {sources.get(key, path)})")
  return lines
