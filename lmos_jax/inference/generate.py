"""`lmos generate`: text from a trained workdir through the compiled KV-cache decoder.

  lmos generate --workdir DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
                [--top-k K] [--top-p P] [--min-p M] [--seed S] [--stop TEXT]

`--prompt` may be repeated: the prompts decode together as one batch of different lengths.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import ml_collections

from lmos_jax.config.schema import base_config
from lmos_jax.errors import ArgumentParser, UserError, existing_dir, number
from lmos_jax.models.decode import Decoder, Sampling


def load_trained(workdir: str | Path, data_path: str | None = None):
  """(run, params) of the latest checkpoint in `workdir`, on one device.

  The run (config, data with its tokenizer, graphdef) is rebuilt from config.json exactly
  as the trainer built it, so the checkpoint's tree and the tokenizer match.
  """
  from lmos_jax.train.checkpoint import Checkpointer, abstract_like
  from lmos_jax.train.trainer import build_run

  workdir = Path(workdir)
  cfg_file = workdir / "config.json"
  if not cfg_file.is_file():
    raise FileNotFoundError(f"--workdir={workdir}: no config.json; is it a training workdir?")
  cfg = _merge(base_config(), json.loads(cfg_file.read_text()))
  if data_path:
    cfg.data.path = data_path
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
  run = build_run(cfg, devices=jax.devices()[:1])
  ckpt = Checkpointer(workdir, keep=10, async_save=False)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"--workdir={workdir}: no checkpoint under {ckpt.directory}")
  state, _ = ckpt.restore(step, abstract_like(run.abstract_state, run.shardings))
  ckpt.close()
  return run, state["params"]


def _merge(base: ml_collections.ConfigDict, saved: dict) -> ml_collections.ConfigDict:
  """The saved config over today's defaults: keys added to the schema since keep defaults."""
  for key, value in saved.items():
    if key in base and isinstance(value, dict):
      _merge(base[key], value)
    else:
      base[key] = value
  return base


def parse(argv: list[str]) -> argparse.Namespace:
  p = ArgumentParser(prog=argv[0], description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, type=existing_dir("config.json"))
  p.add_argument("--prompt", action="append", default=None,
                 help="prompt text (repeat for a batch); default: a newline")
  p.add_argument("--max-new-tokens", type=number(int, 0), default=100)
  p.add_argument("--temperature", type=number(float, 0), default=0.8, help="0 means greedy")
  p.add_argument("--top-k", type=number(int, 0), default=0, help="0: off")
  p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=1.0,
                 help="1: off")
  p.add_argument("--min-p", type=number(float, 0, 1), default=0.0, help="0: off")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stop", action="append", default=[], help="stop at this token's text")
  p.add_argument("--cache-len", type=number(int, 0), default=0,
                 help="0: the model's max_seq_len")
  p.add_argument("--data-path", default=None, help="override data.path of the run")
  return p.parse_args(argv[1:])


def check_lengths(model_cfg, cache_len: int, longest_prompt: int) -> None:
  """--cache-len within the model's learned positions, and the prompts within the cache:
  refused before anything compiles."""
  if model_cfg.pos_emb == "learned" and cache_len > model_cfg.max_seq_len:
    raise UserError(f"--cache-len={cache_len} exceeds the model's learned positions "
                    f"(model.max_seq_len={model_cfg.max_seq_len}); use at most "
                    f"{model_cfg.max_seq_len}, or 0 for that")
  if longest_prompt > cache_len:
    raise UserError(f"--prompt: a prompt has {longest_prompt} tokens but the cache holds "
                    f"{cache_len}; shorten it or raise --cache-len")


def main(argv: list[str]) -> int:
  args = parse(argv)
  run, params = load_trained(args.workdir, args.data_path)
  tok = run.data.tokenizer
  prompts = args.prompt or ["\n"]
  try:
    ids = [list(tok.encode(p)) for p in prompts]
  except UserError as e:  # e.g. characters outside a char vocabulary
    raise UserError(f"{'--prompt' if args.prompt else 'the default prompt (a newline)'}: {e}"
                    ) from None
  if any(len(i) == 0 for i in ids):
    print("lmos generate: a prompt encodes to no tokens; give at least one character",
          file=sys.stderr)
    return 2
  stops = []
  for s in args.stop:
    try:
      enc = list(tok.encode(s))
    except UserError as e:
      raise UserError(f"--stop={s!r}: {e}") from None
    if len(enc) != 1:
      print(f"lmos generate: --stop={s!r} is {len(enc)} tokens; give one token's text",
            file=sys.stderr)
      return 2
    stops.append(enc[0])
  cache_len = args.cache_len or run.cfg.model.max_seq_len
  check_lengths(run.cfg.model, cache_len, max(len(i) for i in ids))
  dec = Decoder(run.graphdef, cache_len)
  out = dec.generate(params, ids, args.max_new_tokens,
                     sampling=Sampling(args.temperature, args.top_k, args.top_p, args.min_p),
                     stop_tokens=stops, seed=args.seed)
  for prompt, toks, status in zip(prompts, out.tokens, out.status):
    print(prompt + tok.decode(toks))
    print(f"--- [{len(toks)} tokens, {status}]", flush=True)
  return 0
