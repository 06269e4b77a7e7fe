"""Errors in the data a run was given (files, columns, text), as opposed to config values.

Both kinds are `UserError`s, which `lmos` reports as one line naming the file or field and
the fix (exit 2), before anything compiles. `DataError` is a ValueError and
`DataFileNotFoundError` a FileNotFoundError too, so callers that catch those keep working.
"""

from __future__ import annotations

from lmos_jax.errors import UserError


class DataError(UserError, ValueError):
  """A data file or its content is unusable; the message names the file or field."""


class DataFileNotFoundError(DataError, FileNotFoundError):
  """A data path or glob matches no file."""
