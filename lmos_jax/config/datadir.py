"""Where the public datasets live: one folder, named by a flag, `LMOS_DATA_DIR` or `data/`.

Configs and experiment scripts name a dataset by its path inside that folder
(`data_file("sst2/train.tsv")`), so no config carries the layout of one machine. The
folder is resolved when the config is built; `--config.data.path=...` (or a script's own
`--data` flag) still overrides the resulting path.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "LMOS_DATA_DIR"
DEFAULT_DIR = "data"


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
  """The data folder: `explicit` (a flag or config value) if given, else $LMOS_DATA_DIR,
  else `data/` under the current directory. The folder need not exist (checked on use)."""
  if explicit:
    return Path(explicit).expanduser()
  env = os.environ.get(ENV_VAR, "")
  return Path(env).expanduser() if env else Path(DEFAULT_DIR)


def data_file(relpath: str, explicit: str | os.PathLike | None = None) -> str:
  """`relpath` inside the data folder, as the string a config field holds."""
  return str(data_dir(explicit) / relpath)


def missing_hint(field: str) -> str:
  """The fix to print after 'no such file' for a data path held in config field `field`."""
  return (f"set {ENV_VAR} to the folder holding the datasets (now {str(data_dir())!r}) "
          f"or config '{field}' to the file's path")
