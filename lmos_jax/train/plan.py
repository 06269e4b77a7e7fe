"""`lmos plan`: choose the mesh, microbatch count and remat policy for a config.

For every layout (mesh data x fsdp x tensor, microbatches, remat policy) the planner
estimates per-device memory and step time, drops what does not fit the device memory and
ranks the rest by estimated step time. Two sources of numbers:

- *compiled*: for devices that are present, the train step is compiled ahead of time from
  abstract inputs (`jax.jit(...).lower(ShapeDtypeStructs).compile()`, nothing allocated) and
  its `memory_analysis()` / `cost_analysis()` are read. Compiling is slow, so only the best
  `--compile-top` layouts of the analytic ranking are compiled.
- *analytic*: for a described target without devices (`--target h200x8`, `tpu-v5e-8`) a
  memory model (params, grads, Adam moments, accumulators, saved activations per remat
  policy, logits) and a step-time model (FLOPs at a fixed fraction of peak plus ring
  collectives at link bandwidth, not overlapped) are used, and the table says so.

The best layout is printed as `--config.*` flags and, with `--out`, written as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from lmos_jax.errors import UserError

GiB = 1024 ** 3
REMAT_CHOICES = ("none", "dots", "dots_no_batch", "save_attn_out", "full")
# Forward-recompute cost of each remat policy as a multiple of the no-remat step FLOPs
# (the backward pass is 2x the forward; full remat adds one forward: 8/6).
REMAT_FLOPS = {"none": 1.0, "dots": 1.02, "dots_no_batch": 1.05, "save_attn_out": 1.2,
               "full": 4.0 / 3.0}
MATMUL_EFFICIENCY = 0.6  # fraction of peak a large matmul-bound step reaches (assumed)
# per-device MACs of one MLP matmul at which efficiency halves (a 512^3 matmul): tiny
# per-device shards (many microbatches, wide meshes on small models) run below peak
HALF_EFFICIENCY_MACS = 512 ** 3
# fixed cost per layer and microbatch (kernel launches / op dispatch, forward + backward):
# a floor on step time for tiny models, and the price of each extra microbatch
LAYER_OVERHEAD_S = 1e-4
# share of device memory a layout may plan to use: the runtime, fragmentation and the
# analytic model's error (it is within ~2x of XLA's own numbers on CPU) need the rest
MEMORY_HEADROOM = 0.9


class PlanError(ValueError):
  """No layout fits; the message says what would (devices, batch, remat)."""


class PlanFlagError(PlanError, UserError):
  """A `lmos plan` flag is wrong (exit 2, like every bad input); a bare PlanError is a
  result, nothing fits (exit 1)."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """What the step-time and memory models need to know about one accelerator."""

  name: str
  memory: float  # bytes of device memory
  bf16_flops: float  # dense peak FLOP/s
  f32_flops: float
  hbm_bw: float  # bytes/s
  link_bw: float  # bytes/s per device for collectives (one direction)


# Spec-sheet figures (dense, no sparsity). f32 on GPUs is the TF32 tensor-core rate that
# JAX's default matmul precision uses; TPUs run f32 matmuls as bf16 passes (~1/3 rate).
CHIPS = {
    "h200": Chip("h200", 141e9, 989e12, 494e12, 4.8e12, 450e9),
    "h100": Chip("h100", 80e9, 989e12, 494e12, 3.35e12, 450e9),
    "a100": Chip("a100", 80e9, 312e12, 156e12, 2.0e12, 300e9),
    "tpu-v5e": Chip("tpu-v5e", 16e9, 197e12, 66e12, 819e9, 200e9),
    "tpu-v5p": Chip("tpu-v5p", 95e9, 459e12, 153e12, 2.76e12, 600e9),
    "tpu-v4": Chip("tpu-v4", 32e9, 275e12, 92e12, 1.2e12, 300e9),
    "tpu-v6e": Chip("tpu-v6e", 32e9, 918e12, 306e12, 1.6e12, 400e9),
}


@dataclasses.dataclass(frozen=True)
class Target:
  chip: Chip
  num_devices: int
  described: bool  # True: no devices present, analytic estimates only


def parse_target(spec: str) -> Target:
  """'h200x8', 'a100x4', 'tpu-v5e-8', 'tpu-v4-32' -> a described Target."""
  m = re.fullmatch(r"([a-z0-9-]+?)(?:x|-)(\d+)", spec.strip().lower())
  if not m or m.group(1) not in CHIPS or int(m.group(2)) <= 0:
    known = ", ".join(f"{c}x8" if not c.startswith("tpu") else f"{c}-8" for c in CHIPS)
    raise PlanFlagError(f"--target={spec!r}: expected CHIPxN or tpu-VERSION-N, one of: "
                        f"{known}")
  return Target(CHIPS[m.group(1)], int(m.group(2)), described=True)


def target_name(chip: Chip, n: int) -> str:
  return f"{chip.name}-{n}" if chip.name.startswith("tpu") else f"{chip.name}x{n}"


def present_target(num_devices: int | None, peak_flops: float | None = None) -> Target:
  """The devices this process sees (the first `num_devices` of them)."""
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise PlanFlagError(f"--devices={n}: only {len(devices)} {devices[0].platform} devices "
                        "are present; use --target (e.g. h200x8) to plan for devices not here")
  d = devices[0]
  stats = d.memory_stats() if hasattr(d, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    memory = float(stats["bytes_limit"])
  else:  # CPU: simulated devices share the host's memory
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / n
  kind = d.device_kind.lower()
  chip = next((c for k, c in CHIPS.items() if k.replace("tpu-", "tpu ") in kind), None)
  if chip is None or d.platform == "cpu":
    from lmos_jax.train.metrics import measure_cpu_peak
    peak = (peak_flops or measure_cpu_peak()) / n  # simulated devices share the cores
    chip = Chip(kind, memory, peak, peak, 10e9, 10e9)
  else:
    chip = dataclasses.replace(chip, memory=memory)
  return Target(chip, n, described=False)


@dataclasses.dataclass(frozen=True)
class Layout:
  data: int
  fsdp: int
  tensor: int
  microbatches: int
  remat: str

  def overrides(self) -> dict[str, Any]:
    return {"mesh.data": self.data, "mesh.fsdp": self.fsdp, "mesh.tensor": self.tensor,
            "train.microbatches": self.microbatches, "model.remat": self.remat}


@dataclasses.dataclass
class Estimate:
  layout: Layout
  memory: float  # bytes per device
  step_s: float
  flops: float  # per device per step
  source: str  # analytic | compiled
  fits: bool = True


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """The numbers the analytic models need, read from a config (no model is built)."""

  num_layers: int
  d_model: int
  d_ff: int
  num_heads: int
  kv_heads: int
  vocab: int
  seq_len: int
  batch: int
  params: int
  flops_per_token: float
  param_bytes: int
  compute_bytes: int


def model_shape(cfg, vocab: int, backend: str) -> ModelShape:
  from flax import nnx
  from lmos_jax.models.factory import model_factory
  from lmos_jax.train.metrics import flops_per_token
  from lmos_jax.train.precision import resolve_policy
  model = nnx.eval_shape(lambda: model_factory(cfg.model, vocab)(nnx.Rngs(0)))
  tcfg = model.cfg
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  policy = resolve_policy(cfg.train.precision, backend)
  return ModelShape(tcfg.num_layers, tcfg.d_model, tcfg.d_ff, tcfg.num_heads, tcfg.kv_heads,
                    tcfg.vocab_size, cfg.data.seq_len, cfg.train.batch_size, params,
                    flops_per_token(tcfg, cfg.data.seq_len),
                    jnp.dtype(policy.param_dtype).itemsize,
                    jnp.dtype(policy.compute_dtype).itemsize)


def enumerate_layouts(s: ModelShape, num_devices: int, remats: Sequence[str],
                      max_microbatches: int) -> list[Layout]:
  """Every (data, fsdp, tensor) mesh over the devices, microbatch count and remat policy
  that the config's validation would accept (batch divisible, tensor dividing the heads)."""
  out = []
  for tensor in _divisors(num_devices):
    if s.num_heads % tensor or s.kv_heads % tensor:
      continue
    for fsdp in _divisors(num_devices // tensor):
      data = num_devices // tensor // fsdp
      k = 1
      while k <= max_microbatches and s.batch % k == 0:
        if (s.batch // k) % (data * fsdp) == 0:
          out += [Layout(data, fsdp, tensor, k, r) for r in remats]
        k *= 2
  return out


def _divisors(n: int) -> list[int]:
  return [i for i in range(1, n + 1) if n % i == 0]


def activation_bytes_per_token(s: ModelShape, remat: str, tensor: int,
                               flash_attention: bool) -> float:
  """Bytes one layer keeps for the backward pass per token (Korthikanti et al. 2022 style).

  No remat: LN inputs, q/k/v, attention output, MLP up and GELU output, residuals, plus the
  f32 attention probabilities when attention is not a fused (flash) kernel. Remat policies
  keep less: matmul outputs only (dots), the attention output (save_attn_out), or only the
  layer input (full, whose recompute needs one layer's full set at a time).
  """
  d, f, cb = s.d_model, s.d_ff, s.compute_bytes
  attn_probs = 0.0 if flash_attention else 2 * 4 * s.num_heads * s.seq_len / tensor
  full = cb * (4 * d + (3 * d + d + 2 * f) / tensor) + attn_probs
  if remat == "none":
    return full
  if remat in ("dots", "dots_no_batch"):
    probs = attn_probs if remat == "dots" else 0.0
    return cb * (2 * d + (3 * d + d + f) / tensor) + probs
  if remat == "save_attn_out":
    return cb * (d + d / tensor)
  return cb * d  # full


def analytic_estimate(s: ModelShape, lay: Layout, target: Target) -> Estimate:
  """Per-device memory and step time of one layout from closed-form models."""
  n = target.num_devices
  shard = lay.fsdp * lay.tensor
  pb, cb = s.param_bytes, s.compute_bytes
  # params + grads + Adam mu, nu (param dtype) + the f32 accumulator when microbatching
  states = s.params * (4 * pb + (4 if lay.microbatches > 1 else 0)) / shard
  if cb != pb:
    states += s.params * cb / shard  # compute-dtype copy of the params
  layer_params = (s.params - s.vocab * s.d_model) / max(s.num_layers, 1)
  gathered = 2 * layer_params * cb / lay.tensor if lay.fsdp > 1 else 0.0  # fsdp all-gather
  tokens = s.batch * s.seq_len / (lay.data * lay.fsdp * lay.microbatches)  # per device-mb
  flash = target.described  # GPUs/TPUs: fused attention keeps no (T, T) probabilities
  saved = s.num_layers * tokens * activation_bytes_per_token(s, lay.remat, lay.tensor, flash)
  if lay.remat != "none":  # recomputing one layer needs its full activations at once
    saved += tokens * activation_bytes_per_token(s, "none", lay.tensor, flash)
  logits = 3 * tokens * s.vocab * 4 / lay.tensor  # f32 logits, softmax and its gradient
  memory = states + gathered + saved + logits
  flops = s.flops_per_token * s.batch * s.seq_len * REMAT_FLOPS[lay.remat] / n
  return Estimate(lay, memory, step_time(s, lay, target, flops), flops, "analytic")


def step_time(s: ModelShape, lay: Layout, target: Target, flops_per_device: float) -> float:
  """Compute at MATMUL_EFFICIENCY of peak (lower for small per-device matmuls), plus
  ring-collective time at link bandwidth (assumed not overlapped with compute), plus a
  fixed dispatch cost per layer and microbatch."""
  chip = target.chip
  peak = chip.bf16_flops if s.compute_bytes == 2 else chip.f32_flops
  tokens = s.batch * s.seq_len / (lay.data * lay.fsdp * lay.microbatches)
  macs = tokens * s.d_model * s.d_ff / lay.tensor
  eff = MATMUL_EFFICIENCY * macs / (macs + HALF_EFFICIENCY_MACS)
  compute = flops_per_device / (peak * eff)
  k, d, f, t, cb = lay.microbatches, lay.data, lay.fsdp, lay.tensor, s.compute_bytes
  p_shard = s.params / t
  comm = 0.0
  if f > 1:  # all-gather params forward and backward (+1 under full remat), reduce-scatter
    gathers = 3 if lay.remat == "full" else 2
    comm += k * (gathers + 1) * p_shard * cb * (f - 1) / f
  if d > 1:  # all-reduce of the (fsdp-sharded) grads, once per microbatch
    comm += k * 2 * (d - 1) / d * p_shard / f * cb
  if t > 1:  # Megatron: 2 all-reduces forward, 2 backward per layer (+2 under full remat)
    n_ar = 6 if lay.remat == "full" else 4
    comm += k * s.num_layers * n_ar * 2 * (t - 1) / t * tokens * s.d_model * cb
  overhead = k * max(s.num_layers, 1) * LAYER_OVERHEAD_S
  return compute + comm / chip.link_bw + overhead


@dataclasses.dataclass
class StepBuild:
  """A config's jitted train step and its state layout on a mesh (nothing allocated)."""

  mesh: Any
  init_fn: Any  # PRNGKey -> state (jit it with out_shardings=shardings)
  abstract: Any
  shardings: dict
  step_fn: Any  # jitted (state, batch) -> (state, metrics), state donated

  def abstract_inputs(self, batch: int, seq_len: int):
    """ShapeDtypeStructs with shardings for AOT `step_fn.lower(...)`."""
    from lmos_jax.parallel.sharding import batch_sharding
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                         self.abstract, self.shardings)
    tok = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32,
                               sharding=batch_sharding(self.mesh, 2))
    return state, {"inputs": tok, "targets": tok}

  def compile(self, batch: int, seq_len: int):
    with jax.set_mesh(self.mesh):
      return self.step_fn.lower(*self.abstract_inputs(batch, seq_len)).compile()


def build_step(cfg, vocab: int, devices: Sequence[Any]) -> StepBuild:
  """The train step `lmos train` runs for `cfg` (mesh, remat, microbatches from cfg)."""
  from lmos_jax.models.factory import model_factory
  from lmos_jax.parallel.sharding import make_mesh
  from lmos_jax.train.optim import make_optimizer, make_schedule
  from lmos_jax.train.precision import resolve_policy
  from lmos_jax.train.step import StepConfig, jit_train_step, train_state_layout
  from lmos_jax.train.trainer import loss_for_task

  mesh = make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), devices)
  policy = resolve_policy(cfg.train.precision, devices[0].platform)
  tx = make_optimizer(cfg.train)
  graphdef, init_fn, abstract, shardings = train_state_layout(
      model_factory(cfg.model, vocab), tx, policy, mesh)
  step_cfg = StepConfig(graphdef=graphdef, tx=tx, loss_fn=loss_for_task(cfg.task),
                        policy=policy, microbatches=cfg.train.microbatches, l2=cfg.train.l2,
                        decay_embeddings=cfg.train.decay_embeddings,
                        decay_norms_and_biases=cfg.train.decay_norms_and_biases,
                        schedule=make_schedule(cfg.train))
  fn = jit_train_step(step_cfg, shardings, mesh, {"inputs": 2, "targets": 2})
  return StepBuild(mesh, init_fn, abstract, shardings, fn)


def compiled_memory(compiled) -> float:
  """Peak bytes per device the compiled step needs: live arguments, outputs and temps."""
  mem = compiled.memory_analysis()
  return float(mem.argument_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes + mem.temp_size_in_bytes)


def compiled_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def compiled_estimate(cfg, vocab: int, lay: Layout, target: Target, s: ModelShape) -> Estimate:
  """Memory and FLOPs read from the AOT-compiled train step (abstract inputs only)."""
  c = apply_overrides(cfg, lay.overrides())
  compiled = build_step(c, vocab, jax.devices()[:target.num_devices]).compile(s.batch,
                                                                              s.seq_len)
  memory, flops = compiled_memory(compiled), compiled_flops(compiled)
  if flops <= 0:  # some backends report no FLOPs: the model count is used, and said so
    return Estimate(lay, memory, analytic_estimate(s, lay, target).step_s, 0.0,
                    "compiled mem, analytic time")
  return Estimate(lay, memory, step_time(s, lay, target, flops), flops, "compiled")


def apply_overrides(cfg, overrides: dict[str, Any]):
  """A copy of `cfg` with dotted keys set ('mesh.fsdp': 8)."""
  c = cfg.copy_and_resolve_references()
  for key, value in overrides.items():
    block, _, field = key.rpartition(".")
    node = c
    for part in block.split(".") if block else ():
      node = node[part]
    node[field] = value
  return c


def vocab_of(cfg) -> int:
  """The model's vocabulary without reading the corpus when the config pins it."""
  if cfg.model.vocab_size:
    return cfg.model.vocab_size
  if cfg.data.tokenizer == "byte":
    return 256
  from lmos_jax.data.build import build_data
  return build_data(cfg).tokenizer.vocab_size


@dataclasses.dataclass
class Plan:
  target: Target
  estimates: list[Estimate]  # fitting first, ranked by step time
  shape: ModelShape

  @property
  def best(self) -> Estimate:
    return self.estimates[0]


def make_plan(cfg, target: Target, *, remats: Sequence[str] = ("none", "dots_no_batch", "full"),
              max_microbatches: int = 8, compile_top: int = 6) -> Plan:
  """Enumerates layouts, estimates them, keeps those that fit, ranks by step time."""
  bad = [r for r in remats if r not in REMAT_CHOICES]
  if bad:
    raise PlanFlagError(f"--remat: unknown policies {bad}; choose from "
                        f"{', '.join(REMAT_CHOICES)}")
  backend = "gpu" if target.described and not target.chip.name.startswith("tpu") else (
      "tpu" if target.described else jax.devices()[0].platform)
  vocab = vocab_of(cfg)
  s = model_shape(cfg, vocab, backend)
  layouts = enumerate_layouts(s, target.num_devices, remats, max_microbatches)
  if not layouts:
    raise PlanError(f"no mesh of {target.num_devices} devices divides train.batch_size="
                    f"{s.batch} and model.num_heads={s.num_heads}; use a batch that is a "
                    f"multiple of {target.num_devices}")
  ests = [analytic_estimate(s, lay, target) for lay in layouts]
  budget = MEMORY_HEADROOM * target.chip.memory
  ests.sort(key=lambda e: (e.memory > budget, e.step_s, e.memory))
  if not target.described:
    ests[:compile_top] = [compiled_estimate(cfg, vocab, e.layout, target, s)
                          for e in ests[:compile_top]]
  for e in ests:
    e.fits = e.memory <= budget
  fitting = sorted((e for e in ests if e.fits),
                   key=lambda e: (e.source == "analytic" and not target.described, e.step_s,
                                  e.memory))
  if not fitting:
    raise PlanError(nothing_fits_message(cfg, target, s, ests, remats, max_microbatches))
  rest = sorted((e for e in ests if not e.fits), key=lambda e: e.memory)
  return Plan(target, fitting + rest, s)


def nothing_fits_message(cfg, target: Target, s: ModelShape, ests: list[Estimate],
                         remats: Sequence[str], max_microbatches: int) -> str:
  """Says how far off the smallest layout is and what would fit (analytic model)."""
  smallest = min(ests, key=lambda e: e.memory)
  budget = MEMORY_HEADROOM * target.chip.memory
  gib = budget / GiB
  lines = [f"nothing fits in {gib:.2f} GiB per device on {target.num_devices} x "
           f"{target.chip.name}: the smallest layout {_fmt_layout(smallest.layout)} needs "
           f"{smallest.memory / GiB:.1f} GiB ({smallest.source}). What would fit:"]
  n = target.num_devices
  for more in (2 * n, 4 * n, 8 * n, 16 * n, 32 * n, 64 * n):
    t2 = dataclasses.replace(target, num_devices=more)
    lays = enumerate_layouts(s, more, REMAT_CHOICES, max(max_microbatches, 64))
    if any(analytic_estimate(s, l, t2).memory <= budget for l in lays):
      lines.append(f"- {more} devices (e.g. --target {target_name(target.chip, more)}, fsdp)")
      break
  else:
    lines.append(f"- no device count up to {64 * n} (the model state alone is too big)")
  b = s.batch
  while b > 1:
    b //= 2
    s2 = dataclasses.replace(s, batch=b)
    lays = enumerate_layouts(s2, n, REMAT_CHOICES, max(max_microbatches, 64))
    if any(analytic_estimate(s2, l, target).memory <= budget for l in lays):
      lines.append(f"- train.batch_size={b} (or more --max-microbatches)")
      break
  missing = [r for r in ("full", "dots_no_batch") if r not in remats]
  if missing:
    lines.append(f"- also search remat policies {missing} (--remat={','.join(REMAT_CHOICES)})")
  lines.append(f"- a smaller model (it has {s.params / 1e6:.1f}M parameters)")
  return "\n".join(lines)


def _fmt_layout(l: Layout) -> str:
  return (f"(data={l.data}, fsdp={l.fsdp}, tensor={l.tensor}, microbatches={l.microbatches},"
          f" remat={l.remat})")


def format_table(plan: Plan, limit: int = 20) -> str:
  t = plan.target
  tokens = plan.shape.batch * plan.shape.seq_len
  head = (f"plan for {t.num_devices} x {t.chip.name} ({t.chip.memory / GiB:.1f} GiB each, "
          f"{100 * MEMORY_HEADROOM:.0f}% usable; "
          f"{'described target: analytic estimates' if t.described else 'present devices'})"
          f"; {plan.shape.params / 1e6:.1f}M params, batch {plan.shape.batch} x "
          f"{plan.shape.seq_len}")
  rows = [head, "| rank | data | fsdp | tensor | micro | remat | GiB/device | fits | "
          "est step ms | est tokens/s | source |", "|" + "---|" * 11]
  for i, e in enumerate(plan.estimates[:limit]):
    l = e.layout
    rows.append(f"| {i + 1 if e.fits else '-'} | {l.data} | {l.fsdp} | {l.tensor} | "
                f"{l.microbatches} | {l.remat} | {e.memory / GiB:.3f} | "
                f"{'yes' if e.fits else 'no'} | {1e3 * e.step_s:.2f} | "
                f"{tokens / e.step_s:,.0f} | {e.source} |")
  if len(plan.estimates) > limit:
    rows.append(f"... {len(plan.estimates) - limit} more layouts")
  return "\n".join(rows)


def override_flags(overrides: dict[str, Any]) -> str:
  return " ".join(f"--config.{k}={v}" for k, v in overrides.items())


def check_flags(fv) -> None:
  """The numeric flags' ranges, and --devices/--target given together."""
  if fv.target and fv.devices:
    raise PlanFlagError("give --devices (present devices) or --target (described), not both")
  for name, low in (("devices", 1), ("max_microbatches", 1), ("compile_top", 0)):
    value = getattr(fv, name)
    if value is not None and value < low:
      raise PlanFlagError(f"--{name}={value}: must be >= {low}")
  if fv.memory_gib is not None and not fv.memory_gib > 0:
    raise PlanFlagError(f"--memory_gib={fv.memory_gib}: must be a positive number of GiB")
  if fv.out and not Path(fv.out).parent.is_dir():
    raise PlanFlagError(f"--out={fv.out}: directory {Path(fv.out).parent} does not exist")


def main(argv: list[str]) -> int:
  from absl import flags

  from lmos_jax.config.command_line import config_flag_values, parse_flags

  fv, rest = config_flag_values(argv)
  flags.DEFINE_integer("devices", None, "plan for the first N present devices", flag_values=fv)
  flags.DEFINE_string("target", None, "described target without devices: h200x8, "
                      "tpu-v5e-8, a100x4 ...", flag_values=fv)
  flags.DEFINE_string("remat", "none,dots_no_batch,full", "remat policies to search",
                      flag_values=fv)
  flags.DEFINE_integer("max_microbatches", 8, "largest microbatch count searched",
                       flag_values=fv)
  flags.DEFINE_integer("compile_top", 6, "present devices: AOT-compile this many of the "
                       "analytically best layouts", flag_values=fv)
  flags.DEFINE_float("memory_gib", None, "override the per-device memory budget (GiB)",
                     flag_values=fv)
  flags.DEFINE_string("out", None, "write the best layout's config overrides here (JSON)",
                      flag_values=fv)
  parse_flags(fv, rest)
  check_flags(fv)
  try:
    cpu_devices = None
    if not fv.target:  # the devices `lmos train` would see: a CPU host split per core
      from lmos_jax.parallel.distributed import split_cpu_host_for
      cpu_devices = split_cpu_host_for(fv.config)
    target = parse_target(fv.target) if fv.target else present_target(fv.devices)
    if fv.memory_gib is not None:
      target = dataclasses.replace(
          target, chip=dataclasses.replace(target.chip, memory=fv.memory_gib * GiB))
    plan = make_plan(fv.config, target, remats=[r for r in fv.remat.split(",") if r],
                     max_microbatches=fv.max_microbatches, compile_top=fv.compile_top)
  except PlanError as e:
    if isinstance(e, UserError):
      raise  # `lmos` prints it as one line and exits 2
    print(f"lmos plan: {e}", file=sys.stderr)
    return 1
  print(format_table(plan))
  best = plan.best.layout.overrides()
  if cpu_devices and cpu_devices > 1:  # an explicit mesh would otherwise get one CPU device
    best["mesh.cpu_devices"] = cpu_devices
  print(f"\nbest: {_fmt_layout(plan.best.layout)}\noverrides: {override_flags(best)}")
  if fv.out:
    with open(fv.out, "w") as f:
      json.dump(best, f, indent=2)
    print(f"wrote {fv.out}")
  return 0
