"""Decode tokens/s: lmos KV cache vs lmos full recompute vs transformers' GPT2 generate,
and speculative decoding against plain KV-cache decoding on a trained run.

All three run the same GPT-2-shaped weights (learned positions, pre-LayerNorm, tanh GELU,
biases, tied embeddings), copied from an lmos GPT into `GPT2LMHeadModel`; the script first
checks that the two frameworks' logits agree, then times greedy generation from a one-token
prompt (best of --repeats, after a warm-up/compile call) and prints a table.

With --quant, it times dense float32, bfloat16, int8 and int4 weights (lmos_jax.compress
.quantize; on CPU the C++ kernel of lmos_jax/models/cpu_qmatmul.cc multiplies a decode
step's rows, LMOS_CPU_KERNELS=off times the jax.numpy path instead), and for a model whose
LM head is its embedding also int8 / int4 with that head in int8, at each batch size in
turns (best of --repeats per variant), and prints tokens/s, the ratio to dense float32,
weight bytes, and quality: the share of free-running greedy tokens equal to dense float32's,
the share of positions where the variant's next token equals dense's on dense's own greedy
text (same context, no drift), and, with --quant-workdir RUN (a trained GPT run instead of
the random preset), the validation loss on RUN's data.

With --spec-workdir RUN, it also times greedy batch-1 generation of that trained GPT plainly
and speculatively, the draft being RUN's first --draft-layers layers (compress.trim
.drop_layers, no retraining) or the run --spec-draft-workdir, for each --draft-tokens k: tokens/s, the draft acceptance
rate, whether the output equals the plain greedy output token for token, and the speed-up.

  python3 experiments/bench_decode.py                    # small GPT-2 shape, CPU-friendly
  python3 experiments/bench_decode.py --preset gpt2      # GPT-2 124M shape (random weights)
  python3 experiments/bench_decode.py --spec-workdir runs/sc6 --skip-hf   # speculative only
  python3 experiments/bench_decode.py --preset gpt2 --skip-hf --quant     # quantized decode
  python3 experiments/bench_decode.py --skip-hf --quant --quant-workdir runs/sc_cpu
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from lmos_jax.compress.trim import drop_layers
from lmos_jax.models.decode import Decoder
from lmos_jax.models.speculative import SpeculativeDecoder
from lmos_jax.models.gpt import GPT, count_params
from lmos_jax.models.layers import TransformerConfig

PRESETS = {
    "small": dict(vocab_size=1024, num_layers=4, num_heads=4, d_model=256, max_seq_len=256),
    "gpt2": dict(vocab_size=50257, num_layers=12, num_heads=12, d_model=768, max_seq_len=1024),
}


def lmos_model(preset: str, seed: int = 0):
  p = PRESETS[preset]
  cfg = TransformerConfig(d_ff=4 * p["d_model"], pos_emb="learned", norm="layernorm",
                          mlp="gelu", use_bias=True, tie_embeddings=True, scan_layers=True,
                          init_std=0.02, **p)
  graphdef, state = nnx.split(GPT(cfg, rngs=nnx.Rngs(seed)))
  return cfg, graphdef, jax.device_get(state.to_pure_dict())


def to_hf(cfg: TransformerConfig, params: dict):
  """GPT2LMHeadModel holding the same weights (Conv1D kernels are (in, out) like ours)."""
  import torch
  from transformers import GPT2Config, GPT2LMHeadModel

  hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len,
                      n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                      n_inner=cfg.d_ff, activation_function="gelu_new",
                      layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, tie_word_embeddings=True,
                      bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1)
  model = GPT2LMHeadModel(hf_cfg).eval()
  d = cfg.d_model
  b = params["blocks"]
  t = lambda x: torch.from_numpy(np.array(x, np.float32, copy=True))  # noqa: E731
  sd = {"transformer.wte.weight": t(params["embed"]),
        "transformer.wpe.weight": t(params["pos_embed"]),
        "transformer.ln_f.weight": t(params["final_norm"]["scale"]),
        "transformer.ln_f.bias": t(params["final_norm"]["bias"])}
  for i in range(cfg.num_layers):
    a, m = b["attn"], b["mlp"]
    pre = f"transformer.h.{i}."
    qkv_w = [a[n]["kernel"][i].reshape(d, d) for n in ("query", "key", "value")]
    qkv_b = [a[n]["bias"][i].reshape(d) for n in ("query", "key", "value")]
    sd.update({
        pre + "ln_1.weight": t(b["attn_norm"]["scale"][i]),
        pre + "ln_1.bias": t(b["attn_norm"]["bias"][i]),
        pre + "ln_2.weight": t(b["mlp_norm"]["scale"][i]),
        pre + "ln_2.bias": t(b["mlp_norm"]["bias"][i]),
        pre + "attn.c_attn.weight": t(np.concatenate(qkv_w, axis=1)),
        pre + "attn.c_attn.bias": t(np.concatenate(qkv_b)),
        pre + "attn.c_proj.weight": t(a["out"]["kernel"][i].reshape(d, d)),
        pre + "attn.c_proj.bias": t(a["out"]["bias"][i]),
        pre + "mlp.c_fc.weight": t(m["up"]["kernel"][i]),
        pre + "mlp.c_fc.bias": t(m["up"]["bias"][i]),
        pre + "mlp.c_proj.weight": t(m["down"]["kernel"][i]),
        pre + "mlp.c_proj.bias": t(m["down"]["bias"][i]),
    })
  sd["lm_head.weight"] = sd["transformer.wte.weight"]
  missing, unexpected = model.load_state_dict(sd, strict=False)
  missing = [k for k in missing if not k.endswith("attn.bias") and "masked_bias" not in k]
  if missing or unexpected:
    raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
  return model


def best_time(fn, repeats: int) -> float:
  fn()  # compile / warm up
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--skip-no-cache", action="store_true")
  ap.add_argument("--skip-hf", action="store_true",
                  help="skip the lmos vs transformers rows (only the speculative ones)")
  ap.add_argument("--quant", action="store_true",
                  help="rows for dense f32, bf16, int8 and int4 weights")
  ap.add_argument("--quant-workdir", default=None,
                  help="a trained GPT run for --quant (default: the random --preset model)")
  ap.add_argument("--int4-group", type=int, default=32, help="int4 group size (0: per channel)")
  ap.add_argument("--scan-row", action="store_true",
                  help="with --quant, also dense float32 decoded with the layer scan (the "
                       "GPU/TPU form) instead of the CPU's unrolled layers")
  ap.add_argument("--spec-workdir", default=None, help="a trained GPT run: speculative rows")
  ap.add_argument("--draft-layers", type=int, default=2)
  ap.add_argument("--spec-draft-workdir", default=None,
                  help="a draft run for the speculative rows (default: the target's first "
                       "--draft-layers layers, untrained)")
  ap.add_argument("--draft-tokens", default="2,3,4")
  ap.add_argument("--spec-prompt", default="\n")
  ap.add_argument("--write-draft", default=None,
                  help="also save the trimmed draft as a params-only run here, for "
                       "`lmos generate --draft-workdir`")
  args = ap.parse_args()
  if not args.skip_hf:
    hf_rows(args)
  if args.quant:
    quant_rows(args)
  if args.spec_workdir:
    speculative_rows(args)


SCAN_ROW = "dense float32, layer scan"


def quant_variants(graphdef, params: dict, int4_group: int) -> dict[str, dict]:
  """The weight formats compared, each as the tree the decoder takes."""
  import jax.numpy as jnp

  from lmos_jax.compress.quantize import has_tied_embedding, quantize_params
  to_bf16 = lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
  params = jax.device_put(params)  # every variant on the device: no host copy per call
  int4 = f"int4 (groups of {int4_group or 'all inputs'})"
  out = {"dense float32": params,
         "bfloat16": jax.tree.map(lambda x: to_bf16(jnp.asarray(x)), params),
         "int8 (per channel)": quantize_params(graphdef, params, 8),
         int4: quantize_params(graphdef, params, 4, int4_group)}
  if has_tied_embedding(graphdef, params):  # the LM head is the embedding: quantize it too
    out["int8, int8 LM head"] = quantize_params(graphdef, params, 8, tied_embedding=True)
    out[f"{int4}, int8 LM head"] = quantize_params(graphdef, params, 4, int4_group,
                                                   tied_embedding=True)
  return out


def timed_in_turns(fns: dict, repeats: int) -> dict[str, float]:
  """Best wall seconds per function, each compiled first, then run in turns (so a load
  change on the machine hits every variant alike)."""
  for fn in fns.values():
    fn()
  best = {name: float("inf") for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      best[name] = min(best[name], time.perf_counter() - t0)
  return best


def next_token_argmax(graphdef, params, context_BT: np.ndarray) -> np.ndarray:
  """The model's greedy next token at every position of the given context (one forward):
  agreement with dense float32 on dense's own greedy text, without the drift of free-running
  generation, where one early flip changes every later token."""
  logits_BTV = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, context_BT)
  return np.asarray(jax.numpy.argmax(logits_BTV, axis=-1))


def quant_rows(args) -> None:
  """Decode speed, size and quality of dense, bf16, int8 and int4 weights, one process."""
  from lmos_jax.compress.quantize import param_bytes

  if args.quant_workdir:
    from lmos_jax.inference.compress import load_source, prompt_token, val_loss
    run, params = load_source(args.quant_workdir)
    graphdef, batches = run.graphdef, run.data.val_batches()
    cache_len = run.cfg.model.max_seq_len
    first = prompt_token(run.data.tokenizer)
    what = f"{args.quant_workdir} (trained, {run.cfg.model.num_layers} layers)"
  else:
    _, graphdef, params = lmos_model(args.preset)
    batches, cache_len, first = None, args.new_tokens + 1, 1
    what = f"random {args.preset} preset"
  variants = quant_variants(graphdef, params, args.int4_group)
  scanned = {SCAN_ROW: variants["dense float32"]} if args.scan_row else {}
  print(f"\nquantized decode: {what}, {count_params(params):,} params; greedy from one-token "
        f"prompts to a full cache of {cache_len}; best of {args.repeats}, variants in turns; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}")
  print("\n| weights | batch | tokens/s | vs dense f32 | weight bytes | greedy tokens = dense "
        "f32 | next token = dense f32's, same context | val loss |"
        "\n|---|---:|---:|---:|---:|---:|---:|---:|")
  losses = ({name: val_loss(graphdef, p, batches) for name, p in variants.items()}
            if batches is not None else {})
  for b in [int(x) for x in args.batches.split(",")]:
    prompts = [[(first + i) % 50] for i in range(b)]
    decs = {name: Decoder(graphdef, cache_len, unroll_layers=False if name in scanned else None)
            for name in (*variants, *scanned)}
    rows = {**variants, **scanned}
    n = cache_len - 1
    outs = {name: decs[name].generate(p, prompts, n).tokens for name, p in rows.items()}
    best = timed_in_turns({name: (lambda name=name, p=p: decs[name].generate(p, prompts, n))
                           for name, p in rows.items()}, args.repeats)
    ref = np.concatenate([np.asarray(t) for t in outs["dense float32"]])
    ref_BT = np.stack([np.asarray(t) for t in outs["dense float32"]])
    context_BT = np.concatenate([np.asarray(prompts), ref_BT[:, :-1]], axis=1)
    for name, p in rows.items():
      got = np.concatenate([np.asarray(t) for t in outs[name]])
      agree = float(np.mean(got == ref)) if got.shape == ref.shape else float("nan")
      forced = float(np.mean(next_token_argmax(graphdef, p, context_BT) == ref_BT))
      loss = f"{losses[name]:.4f}" if name in losses else "-"
      print(f"| {name} | {b} | {b * n / best[name]:,.1f} | "
            f"{best['dense float32'] / best[name]:.2f}x | {param_bytes(p):,} | "
            f"{agree:.1%} of {ref.size} | {forced:.1%} | {loss} |", flush=True)


def speculative_rows(args) -> None:
  """Plain vs speculative greedy decoding at batch 1 on a trained run, in this process."""
  from lmos_jax.inference.generate import load_trained
  from lmos_jax.workdir import write_params_run

  run = load_trained(args.spec_workdir)
  n_layers = run.cfg.model.num_layers
  if args.spec_draft_workdir:  # e.g. `lmos compress --method distill:layers=2` of the target
    draft = load_trained(args.spec_draft_workdir)
    dgd, dparams, keep = draft.graphdef, draft.params, draft.cfg.model.num_layers
    what = f"{args.spec_draft_workdir} ({keep} layers, "
  else:
    keep = args.draft_layers
    dgd, dparams = drop_layers(run.graphdef, run.params, list(range(keep, n_layers)))
    what = f"its first {keep} layers ("
  if args.write_draft:
    dcfg = run.cfg.copy_and_resolve_references()
    dcfg.model.num_layers = keep
    write_params_run(args.write_draft, dcfg, run.tokenizer, dparams)
  prompt = [list(run.tokenizer.encode(args.spec_prompt))]
  cache_len = run.cfg.model.max_seq_len
  n = cache_len - len(prompt[0])
  plain = Decoder(run.graphdef, cache_len)
  ref = plain.generate(run.params, prompt, n).tokens[0]
  t_plain = best_time(lambda: plain.generate(run.params, prompt, n), args.repeats)
  print(f"\nspeculative: target {args.spec_workdir} ({n_layers} layers, "
        f"{count_params(run.params):,} params), draft = {what}"
        f"{count_params(dparams):,} params); greedy, batch 1, prompt {args.spec_prompt!r}, "
        f"{n} new tokens, best of {args.repeats}")
  print("\n| decoder | draft tokens k | acceptance | tokens/s | speed-up | same greedy output |"
        "\n|---|---:|---:|---:|---:|---|")
  print(f"| plain KV cache ({n_layers} layers) | - | - | {n / t_plain:,.0f} | 1.00x | - |")
  draft_plain = Decoder(dgd, cache_len)
  t_draft = best_time(lambda: draft_plain.generate(dparams, prompt, n), args.repeats)
  print(f"| draft alone, plain KV cache ({keep} layers) | - | - | {n / t_draft:,.0f} | "
        f"{t_plain / t_draft:.2f}x | - |")
  for k in [int(x) for x in args.draft_tokens.split(",")]:
    spec = SpeculativeDecoder(run.graphdef, dgd, cache_len, k)
    out = spec.generate(run.params, dparams, prompt, n)
    t_spec = best_time(lambda: spec.generate(run.params, dparams, prompt, n), args.repeats)
    same = np.array_equal(out.tokens[0], ref)
    print(f"| speculative | {k} | {out.acceptance_rate:.1%} | {n / t_spec:,.0f} | "
          f"{t_plain / t_spec:.2f}x | {'yes' if same else 'NO'} |")


def hf_rows(args) -> None:
  """lmos KV cache / full recompute vs transformers on the same random GPT-2 weights."""
  import torch

  cfg, graphdef, params = lmos_model(args.preset)
  # the peer runs where lmos runs: on the GPU when JAX has one and torch can reach it
  on_gpu = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
  where = torch.device("cuda" if on_gpu else "cpu")
  hf = to_hf(cfg, params).to(where)
  probe = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 32)).astype(np.int32)
  ours = np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, probe))
  with torch.no_grad():
    theirs = hf(torch.from_numpy(probe).long().to(where)).logits.cpu().numpy()
  print(f"preset {args.preset}: {count_params(params):,} params; max |logit diff| lmos vs "
        f"transformers = {np.abs(ours - theirs).max():.2e}; torch on {where} "
        f"({torch.get_num_threads()} threads), jax {jax.__version__} on "
        f"{jax.devices()[0].platform}")
  n = args.new_tokens
  cache_len = n + 1
  rows = []
  for b in [int(x) for x in args.batches.split(",")]:
    prompts = [[int(i)] for i in range(1, b + 1)]
    dec = Decoder(graphdef, cache_len)
    cached = dec.generate(params, prompts, n)
    t_c = best_time(lambda: dec.generate(params, prompts, n), args.repeats)
    rows.append(("lmos KV cache (while_loop)", b, b * n / t_c))
    if not args.skip_no_cache:
      full = Decoder(graphdef, cache_len, use_cache=False)
      t_f = best_time(lambda: full.generate(params, prompts, n), args.repeats)
      rows.append(("lmos full recompute (no cache)", b, b * n / t_f))
    ids = torch.tensor(prompts, dtype=torch.long, device=where)

    def hf_gen():
      with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, use_cache=True,
                           pad_token_id=0).cpu()  # waits for the device
    out = hf_gen()
    t_h = best_time(hf_gen, args.repeats)
    rows.append(("transformers GPT2LMHeadModel.generate", b, b * n / t_h))
    agree = np.mean([np.mean(np.asarray(cached.tokens[i]) == out[i, 1:].numpy())
                     for i in range(b)])
    print(f"batch {b}: greedy tokens identical to transformers at {agree:.1%} of positions")
  print("\n| decoder | batch | new tokens | tokens/s |\n|---|---:|---:|---:|")
  for name, b, tps in rows:
    print(f"| {name} | {b} | {n} | {tps:,.0f} |")


if __name__ == "__main__":
  main()
