"""The one error type a user sees as a message rather than a traceback.

Every `lmos` command catches `UserError` at its edge, prints `lmos CMD: <message>` on one line
and exits 2. Raise it (or a subclass) wherever the cause is something the user gave (a config
field, a file, a flag value) and the message can name it and say how to fix it; anything else
is a bug and keeps its traceback.

`ArgumentParser` and the `type=` checkers below make argparse flags follow the same rule:
a wrong or out-of-range flag value is a `UserError` naming the flag, raised before any work.
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
from pathlib import Path
from typing import Callable


class UserError(Exception):
  """Bad user input; the message names the field, file or flag, and the fix."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose mistakes raise `UserError` (one line, exit 2 from `lmos`).

  Stock argparse prints the whole usage block and exits from inside the parser; here the
  message names the flag, suggests the closest spelling of a mistyped one (also when argparse
  first complains about the required flag it then misses) and points at `--help`.
  """

  def parse_known_args(self, args=None, namespace=None):
    self._given = list(sys.argv[1:] if args is None else args)
    return super().parse_known_args(args, namespace)

  def error(self, message: str):
    raise UserError(f"{message}{self._did_you_mean()}; see `{self.prog} --help`")

  def _did_you_mean(self) -> str:
    known = [s for s in self._option_string_actions if s.startswith("--")]
    hints = []
    for arg in getattr(self, "_given", []):
      name = arg.split("=", 1)[0]
      if name.startswith("--") and name != "--" and not any(k.startswith(name) for k in known):
        close = difflib.get_close_matches(name, known, n=1)
        hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return f"; unknown flag {', '.join(hints)}" if hints else ""


def number(kind: type = float, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
  """An argparse `type=` that parses `kind` and checks it lies in [low, high] (ends open
  where asked), so `--top-p 2` fails at parse time naming the allowed range."""
  what = "an integer" if kind is int else "a number"
  if low is not None and high is not None:
    want = (f"{what} in {'(' if low_open else '['}{low:g}, {high:g}"
            f"{')' if high_open else ']'}")
  elif low is not None:
    want = f"{what} {'>' if low_open else '>='} {low:g}"
  elif high is not None:
    want = f"{what} {'<' if high_open else '<='} {high:g}"
  else:
    want = what

  def parse(text: str) -> float:
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
    bad = (math.isnan(value)
           or (low is not None and (value <= low if low_open else value < low))
           or (high is not None and (value >= high if high_open else value > high)))
    if bad:
      raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
    return value

  parse.__name__ = kind.__name__
  return parse


def existing_dir(*required: str) -> Callable[[str], str]:
  """An argparse `type=` for a directory that must exist and hold the `required` files,
  so a mistyped --workdir fails at parse time instead of deep inside loading."""

  def parse(text: str) -> str:
    p = Path(text).expanduser()
    if not p.is_dir():
      raise argparse.ArgumentTypeError(f"{text!r} is not a directory; check the path")
    missing = [name for name in required if not (p / name).exists()]
    if missing:
      raise argparse.ArgumentTypeError(
          f"{text!r} has no {' or '.join(missing)}; give a run directory written by "
          "`lmos train` (or `lmos convert --from-hf`)")
    return str(p)

  parse.__name__ = "directory"
  return parse
