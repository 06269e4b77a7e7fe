"""`--config=FILE[:ARG]` and `--config.FIELD=VALUE` flags for `lmos train` and `lmos plan`.

Why not ml_collections' `DEFINE_config_file` alone: it loads every file under one fixed
module name, so a file without `get_config` silently reuses the one loaded before it in the
process; it reads the overrides from `sys.argv` rather than the argv it parses (an in-process
`lmos_jax.cli.main([...])` loses them); and its failures surface as raw tracebacks. Here the
file goes through `load_config_file`, the overrides through `DEFINE_config_dict` against the
argv given, and every mistake becomes a ConfigError naming the flag or the file.
"""

from __future__ import annotations

import difflib
import re

import ml_collections
from absl import flags
from ml_collections import config_flags

from lmos_jax.config.loading import ConfigError, load_config_file

KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}

CONFIG_HELP = ("--config=FILE[:ARG]  config file whose get_config(ARG) returns the run's "
               "ConfigDict\n--config.FIELD=VALUE  override one field, e.g. "
               "--config.train.steps=100")


def split_config_arg(argv: list[str], default: str) -> tuple[str, list[str]]:
  """(the --config value, or `default`; argv without it). Accepts `--config=X`,
  `--config X` and the one-dash forms, as absl does; the last one given wins."""
  spec, rest, i = default, [argv[0]], 1
  while i < len(argv):
    arg = argv[i]
    if arg == "--":
      rest += argv[i:]
      break
    m = re.fullmatch(r"--?config(=(.*))?", arg)
    if m and m.group(1) is not None:
      spec = m.group(2)
    elif m:
      if i + 1 >= len(argv):
        raise ConfigError("--config needs a value: --config=FILE[:ARG]")
      spec, i = argv[i + 1], i + 1
    else:
      rest.append(arg)
    i += 1
  if not spec:
    raise ConfigError("--config is empty; give a config file, e.g. --config=configs/default.py")
  return spec, rest


def config_flag_values(argv: list[str], default: str = "configs/default.py"
                       ) -> tuple[flags.FlagValues, list[str]]:
  """FlagValues holding `config` (the loaded file, overridable field by field) and the argv
  to hand to `parse_flags` once the command has defined its other flags."""
  spec, rest = split_config_arg(argv, default)
  cfg = load_config_file(spec)
  for arg in rest[1:]:  # ml_collections raises bare KeyErrors on these while defining flags
    m = re.match(r"--?(?:no)?config\.([^=]+)", arg)
    if m and unknown_field(cfg, m.group(1)):
      raise ConfigError(unknown_field(cfg, m.group(1)))
  fv = flags.FlagValues()
  config_flags.DEFINE_config_dict("config", cfg, CONFIG_HELP, flag_values=fv, lock_config=True,
                                  sys_argv=rest)
  return fv, rest


def parse_flags(fv: flags.FlagValues, argv: list[str]) -> list[str]:
  """`fv(argv)` with absl's and ml_collections' errors as ConfigErrors naming the flag.

  Positional arguments are refused: every `lmos` flag command takes flags only, and a stray
  word (a value whose `--name=` was forgotten) would otherwise be ignored silently.
  """
  if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
    print(command_help(fv, argv[0]))
    raise SystemExit(0)  # as argparse does for --help
  try:
    rest = fv(argv)
  except flags.UnrecognizedFlagError as e:
    raise ConfigError(_unknown_flag_message(fv, e.flagname, str(e))) from None
  except flags.IllegalFlagValueError as e:
    raise ConfigError(_illegal_value_message(fv, str(e))) from None
  except flags.Error as e:
    raise ConfigError(f"{e}; flags are written --name=value") from None
  if len(rest) > 1:
    raise ConfigError(f"unexpected argument(s) {rest[1:]}; flags are written --name=value")
  return rest


def command_help(fv: flags.FlagValues, prog: str) -> str:
  """Usage text: the config flags, then the command's own flags with their defaults."""
  lines = [f"usage: {prog} [--config=FILE[:ARG]] [--config.FIELD=VALUE ...] [flags]", "",
           *CONFIG_HELP.splitlines()]
  for name in sorted(_own(fv)):
    if name != "config":
      f = fv[name]
      default = "" if f.default is None else f" (default: {f.default})"
      lines.append(f"--{name}={name.upper()}  {f.help}{default}")
  return "\n".join(lines)


def _unknown_flag_message(fv: flags.FlagValues, name: str, absl_message: str) -> str:
  if not name.startswith("config."):
    close = difflib.get_close_matches(name, [n for n in fv if "." not in n], n=1)
    hint = f" (did you mean --{close[0]}?)" if close else ""
    return f"unknown flag --{name}{hint}; the flags are --{', --'.join(sorted(_own(fv)))}"
  return unknown_field(fv["config"].value, name[len("config."):]) or absl_message


def _own(fv: flags.FlagValues) -> list[str]:
  return [n for n in fv if "." not in n]


def unknown_field(cfg: ml_collections.ConfigDict, field: str) -> str:
  """Which part of `field` does not exist in `cfg`, with the closest keys there are (empty
  when the field exists)."""
  parts = field.split(".")
  node, known = cfg, []
  for part in parts:
    if not isinstance(node, ml_collections.ConfigDict):
      return (f"--config.{field}: config '{'.'.join(known)}' is a value, not a block of "
              f"settings; override it as --config.{'.'.join(known)}=VALUE")
    if part not in node:
      keys = list(node.keys())
      close = difflib.get_close_matches(part, keys, n=3)
      hint = f" (did you mean {', '.join(close)}?)" if close else ""
      where = f"'{'.'.join(known)}'" if known else "the top level"
      return (f"--config.{field}: unknown config key {'.'.join(known + [part])!r}{hint}; "
              f"keys under {where}: {', '.join(keys)}")
    node, known = node[part], known + [part]
  return ""


def _illegal_value_message(fv: flags.FlagValues, absl_message: str) -> str:
  """absl says `flag --config.train.steps=abc: invalid literal for int() ...`; this says
  which type the field takes, with its current value as the example."""
  message = re.sub(r"\s+", " ", absl_message).strip()
  m = re.match(r"flag --(config\.[^=]+)=(.*?): ", message)
  if not m:
    return message
  value = fv["config"].value
  for part in m.group(1).split(".")[1:]:
    value = value[part]
  if isinstance(value, ml_collections.ConfigDict):
    return (f"--{m.group(1)}={m.group(2)}: config '{m.group(1)[len('config.'):]}' is a block "
            f"of settings; override one field of it, --{m.group(1)}.FIELD=VALUE")
  kind = KIND_NAMES.get(type(value), type(value).__name__)
  return (f"--{m.group(1)}={m.group(2)}: the field takes {kind} (now {value!r}), and "
          f"{m.group(2)!r} is not one")
