"""`lmos generate`: text from a trained workdir through the compiled KV-cache decoder.

  lmos generate --workdir DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
                [--top-k K] [--top-p P] [--min-p M] [--seed S] [--stop TEXT]
                [--draft-workdir DRAFT [--draft-tokens K]]

`--prompt` may be repeated: the prompts decode together as one batch of different lengths.
With `--draft-workdir`, a smaller model of the same tokenizer drafts K tokens per round and
the model of `--workdir` verifies them in one forward (speculative decoding): greedy output is
the same as without a draft, sampled output follows the same distribution. The speed line on
stderr (`generated N tokens in S s (T tok/s)`) times the generation after a compiling warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from lmos_jax.errors import ArgumentParser, UserError, existing_dir, number
from lmos_jax.models.decode import Decoder, Sampling
from lmos_jax.models.speculative import SpeculativeDecoder
from lmos_jax.workdir import (check_params_fit, latest_params, model_layout, read_config,
                              read_tokenizer, tokenizer_info)


@dataclasses.dataclass(frozen=True)
class Trained:
  """A run read back for inference: its config, tokenizer, model graph and params."""

  cfg: Any
  tokenizer: Any
  graphdef: Any
  params: Any


def load_trained(workdir: str | Path) -> Trained:
  """The latest params of `workdir` on one device, with the model and tokenizer they need.

  Everything comes from the run directory (config.json, tokenizer.json, the newest
  checkpoint's params): no training data is read and no optimizer state is loaded.
  """
  cfg = read_config(workdir)
  tok = read_tokenizer(workdir)
  graphdef, abstract = model_layout(cfg, tok.vocab_size)
  params = latest_params(workdir)
  check_params_fit(abstract, params, f"--workdir {workdir}")
  return Trained(cfg, tok, graphdef, params)


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
  p.add_argument("--draft-workdir", type=existing_dir("config.json"), default=None,
                 help="a smaller GPT with the same tokenizer: speculative decoding")
  p.add_argument("--draft-tokens", type=number(int, 1), default=4,
                 help="tokens the draft proposes per round (with --draft-workdir)")
  return p.parse_args(argv[1:])


def check_draft_tokenizer(workdir: str, draft_workdir: str) -> None:
  """The draft proposes token ids the target scores: both must mean the same ids."""
  target, draft = read_tokenizer(workdir), read_tokenizer(draft_workdir)
  if target.vocab_size != draft.vocab_size:
    raise UserError(f"--draft-workdir {draft_workdir}: its tokenizer has {draft.vocab_size} "
                    f"tokens but --workdir {workdir}'s has {target.vocab_size}; a draft needs "
                    f"the target's tokenizer")
  if tokenizer_info(target) != tokenizer_info(draft):
    raise UserError(f"--draft-workdir {draft_workdir}: its tokenizer differs from --workdir "
                    f"{workdir}'s (same size, other tokens); a draft needs the target's "
                    f"tokenizer")


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
  if args.draft_workdir is not None:  # refused before any params are read
    check_draft_tokenizer(args.workdir, args.draft_workdir)
  try:
    run = load_trained(args.workdir)
  except UserError as e:
    print(f"lmos generate: {e}", file=sys.stderr)
    return 2
  if run.cfg.model.arch != "gpt":
    print(f"lmos generate: --workdir {args.workdir} holds a {run.cfg.model.arch} model "
          f"(task {run.cfg.task!r}); generation needs a decoder (model.arch 'gpt')",
          file=sys.stderr)
    return 2
  tok = run.tokenizer
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
  sampling = Sampling(args.temperature, args.top_k, args.top_p, args.min_p)
  if args.draft_workdir is None:
    dec = Decoder(run.graphdef, cache_len)
    gen = lambda n: dec.generate(run.params, ids, n, sampling=sampling,  # noqa: E731
                                 stop_tokens=stops, seed=args.seed)
  else:
    draft = load_draft(args.workdir, args.draft_workdir)
    check_lengths(draft.cfg.model, cache_len, 0)
    dec = SpeculativeDecoder(run.graphdef, draft.graphdef, cache_len, args.draft_tokens)
    gen = lambda n: dec.generate(run.params, draft.params, ids, n,  # noqa: E731
                                 sampling=sampling, stop_tokens=stops, seed=args.seed)
  gen(0)  # compiles this shape bucket (the token budget is traced): not part of the timing
  t0 = time.perf_counter()
  out = gen(args.max_new_tokens)
  seconds = time.perf_counter() - t0
  for prompt, toks, status in zip(prompts, out.tokens, out.status):
    print(prompt + tok.decode(toks))
    print(f"--- [{len(toks)} tokens, {status}]", flush=True)
  n = sum(len(t) for t in out.tokens)
  print(f"generated {n} tokens in {seconds:.3f} s ({n / seconds:.1f} tok/s)", file=sys.stderr)
  if args.draft_workdir is not None:
    print(f"draft acceptance {out.accepted}/{out.drafted} = {out.acceptance_rate:.1%} "
          f"(--draft-tokens {args.draft_tokens})", file=sys.stderr)
  return 0


def load_draft(workdir: str, draft_workdir: str) -> Trained:
  """The draft run, refused in one line unless it is a GPT with the target's tokenizer."""
  check_draft_tokenizer(workdir, draft_workdir)  # here too for callers other than main
  draft = load_trained(draft_workdir)
  if draft.cfg.model.arch != "gpt":
    raise UserError(f"--draft-workdir {draft_workdir} holds a {draft.cfg.model.arch} model; "
                    f"a draft must be a decoder (model.arch 'gpt')")
  return draft
