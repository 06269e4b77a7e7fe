"""The one error type a user sees as a message rather than a traceback.

Every `lmos` command catches `UserError` at its edge, prints `lmos CMD: <message>` on one line
and exits 2. Raise it (or a subclass) wherever the cause is something the user gave (a config
field, a file, a flag value) and the message can name it and say how to fix it; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
  """Bad user input; the message names the field, file or flag, and the fix."""
