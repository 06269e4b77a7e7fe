"""`lmos` console script: one subcommand per job, each a module with `main(argv)`."""

from __future__ import annotations

import difflib
import gc
import importlib
import re
import sys
from types import ModuleType

from lmos_jax.errors import UserError

# subcommand -> (module, one-line help). Modules are imported only when their command runs,
# so `lmos --help` stays instant and a missing optional dependency breaks only its command.
COMMANDS = {
    "train": ("lmos_jax.train.trainer", "train a model from a config (pretrain or finetune)"),
    "convert": ("lmos_jax.convert", "convert Hugging Face checkpoints to/from a workdir"),
    "predict": ("lmos_jax.inference.predict", "classify sentences with a finetuned workdir"),
    "generate": ("lmos_jax.inference.generate", "generate text from a trained workdir"),
    "compress": ("lmos_jax.inference.compress", "quantize/prune/trim/distill and report"),
    "plan": ("lmos_jax.train.plan_command", "choose hardware, mesh, microbatches and remat"),
    "tune": ("lmos_jax.train.tune", "measure the learning rate and batch size for a config"),
    "export": ("lmos_jax.train.export", "params-only copy of a checkpoint for inference"),
    "report": ("lmos_jax.train.report", "plot and compare runs from their workdirs"),
    "serve": ("lmos_jax.serve.server", "serve a workdir over HTTP (classify, answer, generate)"),
    "monitor": ("lmos_jax.apps.monitor", "opinion trends and negative surges in a text stream"),
    "recommend": ("lmos_jax.inference.recommend", "rank items for users from their histories"),
}


def usage() -> str:
  lines = ["usage: lmos COMMAND [flags]", "", "commands:"]
  lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
  return "\n".join(lines)


def skip_ipython_probe() -> None:
  """Marks IPython as absent in this process, unless something already imported it.

  `flax.nnx` imports IPython at import time only to ask whether it runs inside an IPython
  shell (for colored reprs); the `lmos` command never does, and the import alone costs ~0.2 s
  of a 2-3 s start-up on a 2-core host. A None entry in sys.modules makes that probe's
  `from IPython import ...` raise ImportError, which it handles as "not inside IPython"."""
  sys.modules.setdefault("IPython", None)


def import_command(module_name: str, own_process: bool) -> ModuleType:
  """The command's module; in the console script's own process, imported with the cyclic
  garbage collector paused, and what the import built then frozen.

  Importing jax, flax and optax creates a few hundred thousand objects that live as long as
  the process; the collector's full passes over them while they are created free nothing and
  cost ~0.2 s of a ~2 s warm `lmos train` start-up on a 2-core host. Frozen, they are left out
  of later passes too. A caller of main(argv) keeps its collector as it was."""
  if not own_process:
    return importlib.import_module(module_name)
  was_enabled = gc.isenabled()
  gc.disable()
  try:
    return importlib.import_module(module_name)
  finally:
    gc.freeze()
    if was_enabled:
      gc.enable()


def main(argv: list[str] | None = None) -> int:
  own_process = argv is None  # the `lmos` console script: a process of its own
  if own_process:
    skip_ipython_probe()
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage())
    return 0
  name = argv[0]
  if name not in COMMANDS:
    close = difflib.get_close_matches(name, COMMANDS, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    print(f"lmos: unknown command {name!r}; {hint}commands: {', '.join(COMMANDS)} "
          "(`lmos --help` says what each does)", file=sys.stderr)
    return 2
  module = import_command(COMMANDS[name][0], own_process)
  from absl.flags import Error as FlagError  # absl-parsed commands (export) raise these
  try:
    return int(module.main([f"lmos {name}", *argv[1:]]) or 0)
  except (UserError, FlagError) as e:
    print(f"lmos {name}: {one_line(str(e))}", file=sys.stderr, flush=True)
    return 2


def one_line(message: str) -> str:
  """A message as one line: embedded line breaks (a wrapped library error) become spaces."""
  return re.sub(r"\s*\n\s*", " ", message.strip()) or "invalid input"


if __name__ == "__main__":
  sys.exit(main())
