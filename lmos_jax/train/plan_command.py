"""`lmos plan`: choose the hardware, mesh, microbatch count and remat policy for a config.

The command: parses its flags and the config as `lmos train` does, plans present devices or
a described target (`lmos_jax.train.plan`) or compares several targets (`--compare`,
`lmos_jax.train.hardware`), prints the table (or JSON) and the best layout as `--config.*`
flags, and with `--out`/`--write` saves it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import jax

from lmos_jax.config.plan_file import write_plan
from lmos_jax.errors import ArgumentParser, UserError, number
from lmos_jax.parallel.host_cpu import split_cpu_host_for
from lmos_jax.parallel.host_memory import setup_cpu_allocator
from lmos_jax.train.hardware import (compare_targets, comparison_json, format_comparison,
                                     parse_prices, parse_targets)
from lmos_jax.train.plan import (GiB, PlanError, PlanFlagError, format_layout, format_table,
                                 make_plan, measured_best, override_flags, parse_target,
                                 plan_json, present_target, summary_lines)


def parse(argv: list[str]):
  """`lmos plan`'s own flags (dashes, like the other commands, range-checked as they are
  parsed) and the config, read as `lmos train` reads `--config=FILE[:arg]` and
  `--config.FIELD=VALUE`, so the same command line plans and trains the same run."""
  from lmos_jax.config.command_line import config_flag_values, parse_flags

  ap = ArgumentParser(prog=argv[0], description=__doc__.splitlines()[0],
                      epilog="--config=FILE[:arg] and --config.FIELD=VALUE as for lmos train")
  ap.add_argument("--devices", type=number(int, 1), default=None,
                  help="plan for the first N present devices")
  ap.add_argument("--target", default=None,
                  help="described target without devices: h200x8, tpu-v5e-8, a100x4 ...")
  ap.add_argument("--compare", default=None, metavar="TARGETS",
                  help="which hardware: plan each described target (comma separated, e.g. "
                       "h100x1,h100x8,tpu-v5e-8; `all`: every chip of the table at 1 and 8 "
                       "devices) and compare their best layouts")
  ap.add_argument("--prices", default=None, metavar="CHIP=PRICE,...",
                  help="with --compare: each chip's price per device-hour (e.g. "
                       "h100=2.5,tpu-v5e=1.2), to rank the targets by cost per token")
  ap.add_argument("--remat", default="none,dots_no_batch,full",
                  help="remat policies to search (comma separated)")
  ap.add_argument("--max-microbatches", type=number(int, 1), default=8,
                  help="largest microbatch count searched")
  ap.add_argument("--compile-top", type=number(int, 0), default=6,
                  help="present devices: AOT-compile this many of the analytically best layouts")
  ap.add_argument("--memory-gib", type=number(float, 0.0), default=None,
                  help="override the per-device memory budget (GiB)")
  ap.add_argument("--out", default=None, help="write the best layout's config overrides here "
                  "(JSON)")
  ap.add_argument("--measure", action="store_true",
                  help="present devices: also run each compiled candidate and print measured "
                       "against predicted step time and peak memory")
  ap.add_argument("--steps", type=number(int, 1), default=5,
                  help="with --measure: timed steps per round (a warm-up round, then 5 "
                  "rounds, median; default 5)")
  ap.add_argument("--write", default=None, metavar="WORKDIR",
                  help="merge the best layout into WORKDIR/plan.json, for `lmos train "
                       "--config.plan=WORKDIR/plan.json`")
  ap.add_argument("--no-calibrate", action="store_true",
                  help="present devices: time steps with the spec-sheet constants a described "
                       "target uses instead of this machine's probed speeds")
  ap.add_argument("--recalibrate", action="store_true",
                  help="present devices: probe this machine's speeds again instead of reading "
                       "the kept calibration (it is replaced)")
  ap.add_argument("--json", action="store_true",
                  help="print one JSON list of candidates on stdout instead of the table")
  args, rest = ap.parse_known_args(argv[1:])
  args.remats = [r for r in args.remat.split(",") if r]
  if args.target and args.devices:
    raise PlanFlagError("give --devices (present devices) or --target (described), not both")
  if args.prices and args.compare is None:
    raise PlanFlagError("--prices ranks the targets of --compare by cost; give --compare too")
  present_only = (args.target, args.devices, args.measure, args.write, args.out,
                  args.memory_gib is not None, args.no_calibrate, args.recalibrate)
  if args.compare is not None and any(present_only):
    raise PlanFlagError("--compare plans described targets side by side, each with its own "
                        "memory; it takes no --target, --devices, --measure, --write, --out, "
                        "--memory-gib, --no-calibrate or --recalibrate (plan the chosen one "
                        "with --target, or --measure it on its devices)")
  if args.measure and args.target:
    raise PlanFlagError("--measure runs the step on present devices; it cannot measure a "
                        "described --target")
  if args.memory_gib is not None and not args.memory_gib > 0:
    raise PlanFlagError(f"--memory-gib={args.memory_gib}: must be a positive number of GiB")
  if args.out and not Path(args.out).absolute().parent.is_dir():
    raise PlanFlagError(f"--out={args.out}: directory {Path(args.out).parent} does not exist")
  fv, config_argv = config_flag_values([argv[0], *rest])
  parse_flags(fv, config_argv)
  return args, fv.config


def present_calibration(cfg, num_devices: int | None, fresh: bool = False):
  """The calibration of the devices a present plan uses, kept in the compile cache's
  directory (`train.compile_cache`, `LMOS_COMPILE_CACHE`) beside the host's matmul peak."""
  from lmos_jax.parallel.compile_cache import cache_dir
  from lmos_jax.train.calibrate import load_calibration
  devices = jax.devices()
  directory, _ = cache_dir(str(cfg.train.get("compile_cache", "auto")), os.environ)
  return load_calibration(devices[:num_devices or len(devices)], directory, fresh)


def compare_main(args, cfg) -> int:
  """`lmos plan --compare`: the hardware table (or its JSON)."""
  choices = compare_targets(cfg, parse_targets(args.compare),
                            args.remats, args.max_microbatches,
                            parse_prices(args.prices))
  print(json.dumps(comparison_json(choices)) if args.json else format_comparison(choices, cfg))
  return 0 if any(c.best for c in choices) else 1


def main(argv: list[str]) -> int:
  args, cfg = parse(argv)
  if args.compare is not None:
    return compare_main(args, cfg)
  try:
    cpu_devices = None
    if not args.target:  # the host `lmos train` would set up: split per core, its malloc
      cpu_devices = split_cpu_host_for(cfg)
      setup_cpu_allocator(cfg, cpu_devices or 1)  # before JAX starts its threads
    target = parse_target(args.target) if args.target else present_target(
        args.devices, calibration=None if args.no_calibrate else present_calibration(
            cfg, args.devices, args.recalibrate))
    if args.memory_gib is not None:
      target = dataclasses.replace(
          target, chip=dataclasses.replace(target.chip, memory=args.memory_gib * GiB))
    plan = make_plan(cfg, target, remats=args.remats,
                     max_microbatches=args.max_microbatches, compile_top=args.compile_top,
                     measure_steps=args.steps if args.measure else 0)
  except PlanError as e:
    if isinstance(e, UserError):
      raise  # `lmos` prints it as one line and exits 2
    print(f"lmos plan: {e}", file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps(plan_json(plan, plan.best)))
    for line in summary_lines(plan):  # the table's lines, for a reader of the JSON's run
      print(line, file=sys.stderr)
  else:
    print(format_table(plan))
    fastest = measured_best(plan)
    if fastest is not None and plan.best.measured_step_s is not None:
      ratio = plan.best.measured_step_s / fastest.measured_step_s
      print(f"\nmeasured: the first choice runs at {ratio:.2f}x the measured fastest's step "
            f"time {1e3 * fastest.measured_step_s:.2f} ms {format_layout(fastest.layout)}")
  best = plan.best.layout.overrides()
  if cpu_devices and cpu_devices > 1:  # an explicit mesh would otherwise get one CPU device
    best["mesh.cpu_devices"] = cpu_devices
  if not args.json:
    print(f"\nbest: {format_layout(plan.best.layout)}\noverrides: {override_flags(best)}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(best, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr if args.json else sys.stdout)
  if args.write:
    path = write_plan(args.write, best, "lmos plan")
    print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
  return 0
