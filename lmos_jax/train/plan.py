"""The planner behind `lmos plan`: the mesh, microbatch count and remat policy for a config.

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

Step time, for present devices: a compiled candidate's program is priced op by op
(`lmos_jax.train.hlo_cost`: each dot at the speed probed for that very dot, memory-bound
ops by the bytes they move and whether they transpose or reduce, collectives by bytes,
loops times their trip count), plus the first write of its temporaries, a rendezvous per
collective and one program call; the ops small enough to have run from cache in their
probes are scaled by the machine's program factor (what a step of such ops costs beyond
their prices). The factor and the rendezvous are measured on two reference steps, one
data-parallel and one fully sharded (`program_speed`). The speeds are probed on the
devices, a plan's candidates and the reference steps in the same passes (`probe_together`),
and kept per machine (`lmos_jax.train.calibrate`; `--recalibrate` probes again).
The analytic ranking that picks which layouts to compile uses FLOPs at the probed rate of
each layout's MLP matmul plus collectives and a cost per op; a described target uses its
spec sheet at the matmul efficiency measured on one GPU (`MATMUL_EFFICIENCY`).

The command (flags, printing, `--out`/`--write`) is `lmos_jax.train.plan_command`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmos_jax.config.loading import validate
from lmos_jax.config.schema import CHOICES
from lmos_jax.errors import UserError
from lmos_jax.data.layout import batch_spec, vocab_size
from lmos_jax.models.factory import model_factory
from lmos_jax.parallel.host_memory import HeapPeak, heap_in_use_reader
from lmos_jax.parallel.sharding import abstract_like, batch_sharding, make_mesh
from lmos_jax.train.assemble import assemble_step, splits_opt_state
from lmos_jax.train.calibrate import first_touch_bytes, probe_pass
from lmos_jax.train.hlo_cost import asked_prices, price_program
from lmos_jax.train.metrics import CHIPS, Chip, chip_of, flops_per_token, measure_cpu_peak
from lmos_jax.train.precision import resolve_policy
from lmos_jax.train.step import jit_train_step

GiB = 1024 ** 3
REMAT_CHOICES = CHOICES["model.remat"]
# Forward-recompute cost of each remat policy as a multiple of the no-remat step FLOPs
# (the backward pass is 2x the forward; full remat adds one forward: 8/6).
REMAT_FLOPS = {"none": 1.0, "dots": 1.02, "dots_no_batch": 1.05, "save_attn_out": 1.2,
               "full": 4.0 / 3.0}
# fraction of the spec bf16 peak a large matmul-bound step reaches on a described target, as
# measured on the one accelerator measured so far: GPT-2 124M (seq 1024, bf16, XLA with cuDNN
# attention) ran at 28.3% and 30.3% of one H200's peak at batch 16 and 64
# (experiments/gpu_bench.py), where 0.6 (an assumption) predicted its steps 1.96-2.01x fast
MATMUL_EFFICIENCY = 0.3
# per-device MACs of one MLP matmul at which efficiency halves (a 512^3 matmul): tiny
# per-device shards (many microbatches, wide meshes on small models) run below peak
HALF_EFFICIENCY_MACS = 512 ** 3
# fixed cost per layer and microbatch (kernel launches / op dispatch, forward + backward):
# a floor on step time for tiny models, and the price of each extra microbatch
LAYER_OVERHEAD_S = 1e-4
# ops (kernels, thunks) per layer and microbatch of a forward + backward + update (the
# compiled train step of configs/shakespeare_char.py:cpu has ~190 per layer, of its baby
# config ~300): times the calibrated `op_s`
OPS_PER_LAYER = 250
# share of device memory a layout may plan to use: the runtime, fragmentation and the
# analytic model's error (it is within ~2x of XLA's own numbers on CPU) need the rest
MEMORY_HEADROOM = 0.9
# predicted step times this close (relative) are not told apart by the ranking: one run's
# rows agree with their measurements within ~5-10%, so a 2% difference is not a finding
PRICE_TIE = 0.02


class PlanError(ValueError):
  """The plan has no layout to offer (none divides the batch, or none fits: `NothingFits`);
  the message says why and what would work (devices, batch, remat)."""


class NothingFits(PlanError):
  """No layout fits the target's memory; `smallest` is the layout that comes closest."""

  def __init__(self, message: str, smallest: Estimate):
    super().__init__(message)
    self.smallest = smallest


class PlanFlagError(PlanError, UserError):
  """A `lmos plan` flag is wrong (exit 2, like every bad input); any other PlanError is a
  result, no layout (exit 1)."""


@dataclasses.dataclass(frozen=True)
class Target:
  chip: Chip
  num_devices: int
  described: bool  # True: no devices present, analytic estimates only
  calibration: Any = None  # present devices: a calibrate.Calibration (None: spec constants)


def parse_target(spec: str) -> Target:
  """'h200x8', 'a100x4', 'tpu-v5e-8', 'tpu-v4-32' -> a described Target."""
  plannable = {name: c for name, c in CHIPS.items() if c.link_bw is not None}
  m = re.fullmatch(r"([a-z0-9-]+?)(?:x|-)(\d+)", spec.strip().lower())
  if not m or m.group(1) not in plannable or int(m.group(2)) <= 0:
    known = ", ".join(target_name(c, 8) for c in plannable.values())
    raise PlanFlagError(f"--target={spec!r}: expected CHIPxN or tpu-VERSION-N, one of: {known}")
  return Target(plannable[m.group(1)], int(m.group(2)), described=True)


def target_name(chip: Chip, n: int) -> str:
  return f"{chip.name}-{n}" if chip.name.startswith("tpu") else f"{chip.name}x{n}"


def present_target(num_devices: int | None, peak_flops: float | None = None,
                   calibration: Any = None) -> Target:
  """The devices this process sees (the first `num_devices` of them); with a calibration
  (`calibrate.load_calibration` on those devices), step times come from its probes."""
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
  chip = None if d.platform == "cpu" else chip_of(kind)
  if chip is None or chip.link_bw is None:  # no spec sheet: a matmul probe, nominal links
    peak = (peak_flops or measure_cpu_peak()) / n  # simulated devices share the cores
    chip = Chip(kind, (kind,), peak, peak, memory, 10e9)
  else:
    chip = dataclasses.replace(chip, memory=memory)
  return Target(chip, n, described=False, calibration=calibration)


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
  measured_step_s: float | None = None  # --measure: median seconds per step, run here
  measured_peak: float | None = None  # --measure: peak bytes per device (None: not reported)
  priced: Priced | None = None  # compiled on present devices: its program's prices
  # --measure: predicted as `step_s` is, with the factor and wait of the reference steps timed
  # in the same rounds as the candidates instead of those kept with the calibration
  predicted_alongside_s: float | None = None


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
  opt_over_data: bool = False  # mesh.opt_state: Adam moments split over the data axis


def model_shape(cfg, vocab: int, backend: str) -> ModelShape:
  model = nnx.eval_shape(lambda: model_factory(cfg.model, vocab)(nnx.Rngs(0)))
  tcfg = model.cfg
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  policy = resolve_policy(cfg.train.precision, backend)
  return ModelShape(tcfg.num_layers, tcfg.d_model, tcfg.d_ff, tcfg.num_heads, tcfg.kv_heads,
                    tcfg.vocab_size, cfg.data.seq_len, cfg.train.batch_size, params,
                    flops_per_token(tcfg, cfg.data.seq_len, lm_head=cfg.task != "cls"),
                    jnp.dtype(policy.param_dtype).itemsize,
                    jnp.dtype(policy.compute_dtype).itemsize,
                    splits_opt_state(cfg, backend))


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
  # params + grads + Adam mu, nu (param dtype; mu, nu split over the data devices when the
  # optimizer state is sharded) + the f32 accumulator when microbatching
  zero = lay.data if s.opt_over_data else 1
  states = s.params * (2 * pb + 2 * pb / zero + (4 if lay.microbatches > 1 else 0)) / shard
  if cb != pb:
    states += s.params * cb / shard  # compute-dtype copy of the params
  layer_params = (s.params - s.vocab * s.d_model) / max(s.num_layers, 1)
  gathered = 2 * layer_params * cb / lay.tensor if lay.fsdp > 1 else 0.0  # fsdp all-gather
  tokens = microbatch_tokens(s, lay)
  flash = target.described  # GPUs/TPUs: fused attention keeps no (T, T) probabilities
  saved = s.num_layers * tokens * activation_bytes_per_token(s, lay.remat, lay.tensor, flash)
  if lay.remat != "none":  # recomputing one layer needs its full activations at once
    saved += tokens * activation_bytes_per_token(s, "none", lay.tensor, flash)
  logits = 3 * tokens * s.vocab * 4 / lay.tensor  # f32 logits, softmax and its gradient
  memory = states + gathered + saved + logits
  flops = s.flops_per_token * s.batch * s.seq_len * REMAT_FLOPS[lay.remat] / n
  return Estimate(lay, memory, step_time(s, lay, target, flops), flops, "analytic")


def microbatch_tokens(s: ModelShape, lay: Layout) -> float:
  """Tokens one device runs per microbatch: the batch split over the data and fsdp devices
  and the microbatches (tensor devices share theirs)."""
  return s.batch * s.seq_len / (lay.data * lay.fsdp * lay.microbatches)


def mlp_matmul(s: ModelShape, lay: Layout) -> tuple[int, int, int, Any]:
  """(m, k, n, dtype) of the layout's per-device MLP matmul, whose probed rate stands for
  every FLOP in the calibrated analytic model: one device's microbatch of tokens, the MLP
  width split over the tensor devices."""
  dtype = jnp.bfloat16 if s.compute_bytes == 2 else jnp.float32
  return (max(int(microbatch_tokens(s, lay)), 1), s.d_model, max(s.d_ff // lay.tensor, 1),
          dtype)


def step_time(s: ModelShape, lay: Layout, target: Target, flops_per_device: float) -> float:
  """Compute, plus ring-collective time (assumed not overlapped with compute), plus a fixed
  cost per op. Calibrated (present devices): every FLOP at the probed rate of the layout's
  per-device MLP matmul, collectives at the probed all-reduce bandwidth, OPS_PER_LAYER ops
  per layer and microbatch at the probed op cost, plus one program call. Described:
  MATMUL_EFFICIENCY of peak (lower for small per-device matmuls), spec link bandwidth,
  LAYER_OVERHEAD_S per layer and microbatch."""
  chip, cal = target.chip, target.calibration
  tokens = microbatch_tokens(s, lay)
  if cal is not None:
    compute = flops_per_device / cal.matmul_rate(*mlp_matmul(s, lay))
  else:
    peak = chip.bf16_flops if s.compute_bytes == 2 else chip.f32_flops
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
  if cal is not None:
    ops = k * max(s.num_layers, 1) * OPS_PER_LAYER
    return compute + comm / cal.allreduce_bw + ops * cal.op_s + cal.dispatch_s
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
  batch: dict  # the task's global batch: key -> ArraySpec(shape, dtype)
  policy: str  # the precision policy the step runs (`auto` resolved)

  def abstract_inputs(self):
    """ShapeDtypeStructs with shardings for AOT `step_fn.lower(...)`."""
    state = abstract_like(self.abstract, self.shardings)
    batch = {k: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                     sharding=batch_sharding(self.mesh, len(a.shape)))
             for k, a in self.batch.items()}
    return state, batch

  def lower(self):
    with jax.set_mesh(self.mesh):
      return self.step_fn.lower(*self.abstract_inputs())

  def compile(self):
    return self.lower().compile()


def build_step(cfg, vocab: int, devices: Sequence[Any]) -> StepBuild:
  """The train step `lmos train` runs for `cfg`, one optimizer step per call: the same
  assembly (PEFT, task loss, optimizer, state layout) and the task's batch layout, with the
  mesh, remat and microbatches of `cfg`."""
  mesh = make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), devices)
  step = assemble_step(cfg, mesh, vocab)
  spec = batch_spec(cfg)
  fn = jit_train_step(step.step_cfg, step.shardings, mesh,
                      {k: len(a.shape) for k, a in spec.items()})
  return StepBuild(mesh, step.init_fn, step.abstract, step.shardings, fn, spec,
                   step.step_cfg.policy.name)


def compiled_memory(compiled) -> float:
  """Peak bytes per device the compiled step needs: live arguments, outputs and temps."""
  mem = compiled.memory_analysis()
  return float(mem.argument_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes + mem.temp_size_in_bytes)


def compiled_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def compile_layout(cfg, vocab: int, lay: Layout, target: Target) -> tuple[StepBuild, Any]:
  """The train step of `cfg` with layout `lay`, validated as `lmos train` validates it,
  built and AOT-compiled (abstract inputs only) for the target's first devices."""
  c = apply_overrides(cfg, lay.overrides())
  validate(c, target.num_devices)  # what `lmos train` checks before building this step
  build = build_step(c, vocab, jax.devices()[:target.num_devices])
  return build, build.compile()


def probe_together(cal, num_devices: int, compiled: Sequence[Any], policy: str,
                   scan: bool) -> list[_Runner] | None:
  """Probes every price the `compiled` programs need, and those of the reference steps
  (`program_speed`) where their factor is not kept yet, in the same passes; returns those
  reference steps (compiled, for `program_speed` to time) or None.

  A prediction is the candidate's prices times the reference's measured/priced ratio, so a
  slow spell that lands on the candidate's probes and not on the reference's goes straight
  into the prediction. Probed apart (the first candidate's ops, then the reference's, then
  the other candidates' as each was compiled), one validation of the small shakespeare
  config ran every candidate at 0.78-0.81 of its prediction (0.69-0.71 of the one at the
  calibration's factor), where the five runs before it read 0.83-1.10."""
  refs = None if has_program_speed(cal, policy, scan) else reference_runners(
      num_devices, policy, scan)
  probe_programs(cal, [p.as_text() for p in [*compiled, *(r.compiled for r in refs or ())]],
                 num_devices)
  return refs


def probe_programs(cal, hlo_texts: list[str], num_devices: int) -> None:
  """Probes, in the same passes, every price these compiled programs need (`probe_all`)."""
  asked = asked_prices(hlo_texts, num_devices)
  cal.probe_all(list(asked.dots.values()), sorted(asked.streams))


def program_probes(cal, compiled: Sequence[Any], num_devices: int) -> dict[str, Callable]:
  """Name -> probe of every dot and memory-bound op price the `compiled` programs are priced
  from (what `probe_programs` probes and keeps, here to be probed again)."""
  asked = asked_prices([c.as_text() for c in compiled], num_devices)
  return cal.probes(list(asked.dots.values()), sorted(asked.streams))


def compiled_estimate(cfg, vocab: int, lay: Layout, target: Target, s: ModelShape,
                      programs: dict | None = None) -> Estimate:
  """Memory and FLOPs read from the AOT-compiled train step (abstract inputs only).
  `programs`: the built step and its compiled program by layout: taken from it where this
  layout was compiled already (`compile_layout`), else kept in it, for `--measure` to run
  without compiling again."""
  program = (programs or {}).get(lay) or compile_layout(cfg, vocab, lay, target)
  if programs is not None:
    programs[lay] = program
  build, compiled = program
  memory, flops = compiled_memory(compiled), compiled_flops(compiled)
  model_flops = analytic_estimate(s, lay, target).flops
  # XLA's cost analysis counts a while loop's body once: scanned layers and microbatch
  # loops would look num_layers (or microbatches) times cheaper than they run. The model
  # count stands in, and the table says so (some backends report no FLOPs at all).
  source = "compiled" if flops >= model_flops else "compiled mem, model FLOPs"
  flops = max(flops, model_flops)
  cal = target.calibration
  if cal is not None:  # the program itself, priced op by op at this machine's speeds
    priced = priced_seconds(compiled, cal, target.num_devices)
    # a layout sets the mesh, microbatches and remat, never scan_layers: the config's own
    speed = program_speed(cal, target.num_devices, build.policy, bool(cfg.model.scan_layers))
    step_s = priced_step_s(priced, speed, cal)
    return Estimate(lay, memory, step_s, flops, source.replace("compiled", "compiled HLO", 1),
                    priced=priced)
  return Estimate(lay, memory, step_time(s, lay, target, flops), flops, source)


class Priced(NamedTuple):
  """A compiled step's ops priced one by one at the calibrated speeds (per device): what the
  program factor scales, what it does not, and how many collectives rendezvous per call."""

  cached_s: float
  rest_s: float
  collectives: float


def priced_seconds(compiled, cal, num_devices: int) -> Priced:
  """A compiled step's ops priced one by one at the calibrated speeds (per device), as
  (ops moving at most `hlo_cost.CACHE_BYTES`, everything else with the first write of the
  temporaries, the collectives run per call); the program call and the collectives'
  rendezvous not included. The first part is what the program factor scales: a loop probe
  runs such an op on data its last round left in cache, a step runs it between other ops
  that have passed through the cache, and the reference step (all of its ops small)
  measures the difference. A larger op streams from memory in its probe as in a step: with
  every op scaled by the reference's ratio, the shakespeare baby shape's steps ran at
  0.62-0.67 of their predictions; with only the small ones scaled, at 0.81-1.03 in two
  validations."""
  text = compiled.as_text()
  probe_programs(cal, [text], num_devices)
  priced = price_program(text, cal, num_devices)
  temp = float(compiled.memory_analysis().temp_size_in_bytes)
  rest = priced.total_s - priced.cached_s + first_touch_bytes(temp) * cal.first_touch_s_per_byte
  return Priced(priced.cached_s, rest, priced.collectives)


def priced_step_s(priced: Priced, speed: tuple[float, float], cal) -> float:
  """A step's predicted seconds from its prices and the (factor, wait) of `program_speed`:
  the ops that fit in cache scaled, the rest as priced, a wait per collective, one call."""
  factor, wait_s = speed
  return priced.cached_s * factor + priced.rest_s + priced.collectives * wait_s + cal.dispatch_s


def reference_config(num_devices: int, precision: str = "fp32", fsdp: bool = False,
                     scan: bool = True):
  """A fixed small model (2 layers, 128 wide, 64 tokens, 256 ids, 4 sequences per device)
  trained over `num_devices`: data-parallel with the optimizer state replicated (one
  all-reduce per step), or (`fsdp`) with parameters and state split over the devices (a
  gather or reduction per parameter, ~30 collectives): the reference steps of
  `program_speed`, their layers scanned or not as the candidate's are. Every layout choice
  is spelled out here, so a changed default (`mesh.opt_state=auto`) does not silently
  change what each machine calibrates."""
  from lmos_jax.config.schema import base_config
  c = base_config()
  c.model.num_layers, c.model.num_heads, c.model.d_model = 2, 4, 128
  c.model.max_seq_len, c.model.vocab_size = 64, 256
  c.data.source, c.data.tokenizer, c.data.seq_len = "embedded", "byte", 64
  c.train.batch_size = 4 * num_devices
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (1, num_devices, 1) if fsdp else (num_devices, 1, 1)
  c.mesh.opt_state = "replicated"
  c.train.precision = precision  # a resolved policy: never `auto`, which follows the CPU
  # like for like: on XLA:CPU the scanned reference step's factor read 1.2x the unrolled
  # one's (a loop's own ops and its stacked parameters' slices cost more than priced), and
  # the small shakespeare config's unrolled steps ran at 0.78-0.87 of predictions scaled by
  # the scanned one
  c.model.scan_layers = scan
  return c


def solve_speed(measured: Sequence[float], priced: Sequence[Priced]) -> tuple[float, float]:
  """(factor, wait): the program factor and the seconds each collective adds beyond its
  bytes, from measured step seconds (call taken off) of reference steps that differ in how
  many collectives they run: measured = factor x cached + rest + collectives x wait, one
  equation per step. With one step, or a wait that comes out negative (noise where the
  collectives cost next to nothing), the wait is 0 and the first step sets the factor."""
  a = [m - p.rest_s for m, p in zip(measured, priced)]
  if len(priced) == 2:
    (c1, _, k1), (c2, _, k2) = priced
    det = c1 * k2 - c2 * k1
    wait = (c1 * a[1] - c2 * a[0]) / det if det > 0 else 0.0
    if wait > 0:
      return max((a[0] - k1 * wait) / c1, 0.0), wait
  return max(a[0] / priced[0].cached_s, 0.0), 0.0


def measure_reference(cal, num_devices: int, precision: str = "fp32", scan: bool = True,
                      runners: Sequence[_Runner] | None = None) -> tuple[float, float]:
  """(factor, wait) of `solve_speed` from the reference steps on the first `num_devices`
  devices (data-parallel, and fully sharded where there are several devices), timed in
  turns. The factor: how a whole step of small ops differs from their loop probes (what the
  cache holds when each op starts, the executor's gaps between ops). The wait: what a
  collective costs beyond moving its bytes, the devices meeting at it after drifting apart
  (on 2 CPU devices 110-200 us per collective in such steps, where a loop of one op and one
  small all-reduce read 50-80 us). Measured once per machine on a fixed model (not the
  planned config) and kept with the other probes, one pair per precision policy."""
  runners = runners or reference_runners(num_devices, precision, scan)
  # timed as the candidates are (median of rounds after warm-up, in turns), so their factor
  # is like for like; more and longer rounds than theirs, since these numbers scale every
  # prediction and a round of these small steps lasts only tens of milliseconds. On XLA:CPU
  # the first rounds after loading ran 1.1-1.3x slower than the settled ones for about a
  # second and a half; measured then, the factor priced every candidate 15-25% high.
  times: list[list[float]] = [[] for _ in runners]
  for _ in range(REFERENCE_WARMUP_ROUNDS):
    reference_turn(runners)
  for _ in range(REFERENCE_ROUNDS):
    reference_turn(runners, times)
  return solve_timed(cal, num_devices, runners, times)


def reference_turn(runners: Sequence[_Runner], times: list[list[float]] | None = None) -> None:
  """One round of each reference step, in turns: timed into `times` (one list per step), or
  untimed (a warm-up round) without."""
  for i, r in enumerate(runners):
    seconds = _time_round(r, REFERENCE_STEPS)
    if times is not None:
      times[i].append(seconds)


def solve_timed(cal, num_devices: int, runners: Sequence[_Runner],
                times: list[list[float]]) -> tuple[float, float]:
  """`solve_speed` on the reference steps' median rounds (the call taken off) and prices."""
  return solve_speed([statistics.median(t) - cal.dispatch_s for t in times],
                     [priced_seconds(r.compiled, cal, num_devices) for r in runners])


def reference_runners(num_devices: int, precision: str, scan: bool) -> list[_Runner]:
  """The reference steps of `program_speed`, compiled with a batch: data-parallel, and fully
  sharded where there are several devices."""
  return [_runner(reference_config(num_devices, precision, fsdp, scan), 256, num_devices)
          for fsdp in ((False, True) if num_devices > 1 else (False,))]


def _speed_suffix(precision: str, scan: bool) -> str:
  """How `program_speed`'s numbers for `precision` and `scan` are named in the calibration."""
  return ("" if precision == "fp32" else f" {precision}") + ("" if scan else " unrolled")


def has_program_speed(cal, precision: str = "fp32", scan: bool = True) -> bool:
  """Whether the calibration keeps the reference steps' (factor, wait) for this case."""
  return f"step factor{_speed_suffix(precision, scan)}" in cal.entry


def program_speed(cal, num_devices: int, precision: str = "fp32", scan: bool = True,
                  runners: Sequence[_Runner] | None = None) -> tuple[float, float]:
  """The reference steps' (factor, wait) under `precision` (a resolved policy name), layers
  scanned or not, measured at first use (on `runners` where `probe_together` compiled them)
  and kept with the calibration."""
  suffix = _speed_suffix(precision, scan)
  if not has_program_speed(cal, precision, scan):
    factor, wait = measure_reference(cal, num_devices, precision, scan, runners)
    cal.entry[f"collective wait{suffix}"] = wait
    cal.probed(f"step factor{suffix}", lambda _: factor)
  return float(cal.entry[f"step factor{suffix}"]), float(cal.entry[f"collective wait{suffix}"])


def synthetic_batch(spec: dict, vocab: int, num_labels: int, seed: int = 0) -> dict:
  """A batch of the task's layout with valid values (ids in the vocabulary, one segment,
  full attention, labels in range): step time depends on shapes, not on the text."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, a in spec.items():
    if k in ("inputs", "targets"):
      out[k] = rng.integers(0, vocab, a.shape, dtype=np.int32)
    elif k == "labels":
      out[k] = rng.integers(0, max(num_labels, 1), a.shape, dtype=np.int32)
    elif k == "positions":
      out[k] = np.broadcast_to(np.arange(a.shape[1], dtype=np.int32), a.shape).copy()
    elif k == "token_type_ids":
      out[k] = np.zeros(a.shape, np.int32)
    else:  # weights, attention_mask, segment_ids: every position real, one segment
      out[k] = np.ones(a.shape, a.dtype)
  return out


def peak_bytes(devices: Sequence[Any]) -> float | None:
  """Largest `peak_bytes_in_use` over the devices, or None where the backend keeps no
  allocator statistics (XLA:CPU)."""
  stats = [d.memory_stats() if hasattr(d, "memory_stats") else None for d in devices]
  peaks = [st.get("peak_bytes_in_use") for st in stats if st]
  return float(max(peaks)) if peaks and all(p is not None for p in peaks) else None


MEASURE_ROUNDS = 5
ALONGSIDE_REFERENCE_ROUNDS = 3  # rounds of each reference step per round of the candidates
HEAP_SAMPLES, HEAP_MAX_STEPS = 10, 200  # heap readings per candidate on XLA:CPU; a bound
# passes of those readings; each candidate keeps its least: memory the process takes for
# something else while the steps run can only add to a reading (one of 60 single readings
# of the small shakespeare config's candidates read 36.8 MiB where the others read 26.5-27.5)
HEAP_PASSES = 2
# the reference steps of `program_speed`: untimed rounds and timed rounds of each, steps
# per round
REFERENCE_WARMUP_ROUNDS, REFERENCE_ROUNDS, REFERENCE_STEPS = 4, 15, 20


@dataclasses.dataclass
class _Runner:
  """One candidate's compiled step and batch, ready to be timed in a round."""

  build: StepBuild
  compiled: Any
  batch: dict


def _runner(c, vocab: int, num_devices: int, program: tuple | None = None) -> _Runner:
  """Config `c`'s train step on the first `num_devices` devices, with a batch: `program`
  (build, compiled) when it was compiled already, else built and compiled here."""
  if program is None:
    build = build_step(c, vocab, jax.devices()[:num_devices])
    program = (build, build.compile())
  build, compiled = program
  batch = synthetic_batch(build.batch, vocab, int(c.model.get("num_labels", 0) or 0))
  with jax.set_mesh(build.mesh):
    batch = {k: jax.device_put(v, batch_sharding(build.mesh, v.ndim)) for k, v in batch.items()}
  return _Runner(build, compiled, batch)


def _fresh_state(r: _Runner) -> dict:
  """The candidate's state as `lmos train` starts it (seed 0), under its mesh."""
  state = jax.jit(r.build.init_fn, out_shardings=r.build.shardings)(jax.random.PRNGKey(0))
  return jax.block_until_ready(state)


def _time_round(r: _Runner, steps: int) -> float:
  """Seconds per step of `steps` steps from a fresh state after one warm-up step; the state
  is dropped afterwards, so only one candidate's state is alive at a time."""
  from lmos_jax.train.metrics import median_step_seconds
  with jax.set_mesh(r.build.mesh):
    state, _ = r.compiled(_fresh_state(r), r.batch)
    jax.block_until_ready(state)  # the warm-up (dispatched asynchronously) is not timed
    state, step_s = median_step_seconds(r.compiled, state, r.batch, steps, 1)
  del state
  return step_s


def heap_peak_per_device(r: _Runner, read: Callable[[], int]) -> float:
  """Peak bytes per device of a step on XLA:CPU, from malloc: the heap's growth while steps
  run (their outputs and temporaries: every buffer XLA:CPU holds comes from malloc) plus the
  bytes of the state and batch they are called with, over the devices. The mean device is
  every device for the layouts the plan makes (even shards). Steps run from a fresh state
  after the warm-up round (what a program sets up at its first run is not counted) until
  the heap was read HEAP_SAMPLES times while they ran (at most HEAP_MAX_STEPS steps)."""
  n = r.build.mesh.devices.size
  with jax.set_mesh(r.build.mesh):
    state = _fresh_state(r)
    held = sum(s.data.nbytes for a in jax.tree.leaves((state, r.batch))
               for s in a.addressable_shards)
    with HeapPeak(read) as heap:
      for _ in range(HEAP_MAX_STEPS):
        state, metrics = r.compiled(state, r.batch)
        jax.block_until_ready((state, metrics))
        if heap.samples >= HEAP_SAMPLES:
          break
  del state, metrics
  return (held + heap.grown) / n


def measure_estimates(cfg, vocab: int, ests: list[Estimate], target: Target,
                      steps: int, programs: dict | None = None
                      ) -> tuple[list[Estimate], tuple[float, float] | None]:
  """Runs each layout's real train step (the step `lmos train` compiles) on the present
  devices: an untimed warm-up round, then MEASURE_ROUNDS rounds that time every candidate
  in turn (`steps` steps after a warm-up step, from a fresh state), median per candidate.
  Taking turns keeps a slow spell of a shared machine from landing on one candidate only;
  the warm-up round keeps out what a freshly loaded program costs on its first runs (on
  XLA:CPU the first rounds ran up to 1.3x slower than later ones).

  The reference steps of `program_speed` take their turns in the same rounds, and so does
  a pass of the probes of every dot and memory-bound op the candidates and the reference
  steps are priced from; each candidate is predicted again from the median of those probes with the
  (factor, wait) the reference steps give at them (returned too). A shared machine's speed
  moves between the calibration and the measurement (the data-parallel reference step
  measured 13.1-15.8 ms in four measurements in one process on a 2-core VM, each the median
  of 15 rounds of 20 steps), and the factor scales only the ops that fit in cache: a
  step of large ops (the shakespeare baby shape) keeps the calibration's prices, and in one
  run of ten its three layouts measured 1.14-1.21x those predictions. So this prediction
  prices the program at the machine's speed of the moment, from probes and the reference
  steps only, never from the candidate's own timing. None where a candidate was not priced
  from its program.

  Peak memory: the allocator's peak can only grow, so the warm-up round runs the candidates
  from the smallest predicted memory up and reads the peak after each; a candidate's
  reading is the largest of it and those before it. Where the backend keeps no allocator
  statistics (XLA:CPU) HEAP_PASSES more rounds read each candidate's from the process's
  malloc (`heap_peak_per_device`: steps until the heap was read often enough), the least
  reading kept; None where neither can be read."""
  devices = jax.devices()[:target.num_devices]
  order = sorted(range(len(ests)), key=lambda i: ests[i].memory)
  programs = programs or {}
  runners = {i: _runner(apply_overrides(cfg, ests[i].layout.overrides()), vocab,
                        target.num_devices, programs.get(ests[i].layout)) for i in order}
  times: dict[int, list[float]] = {i: [] for i in order}
  peaks: dict[int, float | None] = {}
  for i in order:  # the warm-up round
    _time_round(runners[i], steps)
    peaks[i] = peak_bytes(devices)
  read = heap_in_use_reader() if None in peaks.values() else None
  if read is not None:  # the least of HEAP_PASSES passes over the candidates, in turns
    passes = [{i: heap_peak_per_device(runners[i], read) for i in order}
              for _ in range(HEAP_PASSES)]
    peaks = {i: min(p[i] for p in passes) for i in order}
  cal = target.calibration
  all_priced = cal is not None and bool(ests) and all(e.priced is not None for e in ests)
  refs = reference_runners(target.num_devices, runners[order[0]].build.policy,
                           bool(cfg.model.scan_layers)) if all_priced else []
  ref_times: list[list[float]] = [[] for _ in refs]
  probes = program_probes(cal, [runners[i].compiled for i in order]
                          + [r.compiled for r in refs], target.num_devices) if refs else {}
  probed: dict[str, list[float]] = {}
  for _ in range(REFERENCE_WARMUP_ROUNDS):
    reference_turn(refs)
  for _ in range(MEASURE_ROUNDS):
    for i in order:
      times[i].append(_time_round(runners[i], steps))
    for _ in range(ALONGSIDE_REFERENCE_ROUNDS):
      reference_turn(refs, ref_times)
    probe_pass(probes, probed)
  speed, alongside = None, {}
  if refs:  # the prices of these rounds' minutes, and the reference steps' speed at them
    now = cal.with_prices({name: statistics.median(s) for name, s in probed.items()})
    speed = solve_timed(now, target.num_devices, refs, ref_times)
    alongside = {i: priced_step_s(priced_seconds(runners[i].compiled, now, target.num_devices),
                                  speed, now) for i in order}
  return [dataclasses.replace(
      e, measured_step_s=statistics.median(times[i]), measured_peak=peaks[i],
      predicted_alongside_s=alongside.get(i)) for i, e in enumerate(ests)], speed


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
  """The model's vocabulary: `model.vocab_size`, else the tokenizer's (the corpus is read
  only when the vocabulary depends on it: char, bpe)."""
  return cfg.model.vocab_size or vocab_size(cfg)


@dataclasses.dataclass
class Plan:
  target: Target
  estimates: list[Estimate]  # fitting first, ranked by step time
  shape: ModelShape
  # --measure: (factor, wait) of the reference steps timed with the candidates, at the
  # prices probed with them
  alongside: tuple[float, float] | None = None

  @property
  def best(self) -> Estimate:
    return self.estimates[0]


def make_plan(cfg, target: Target, *, remats: Sequence[str] = ("none", "dots_no_batch", "full"),
              max_microbatches: int = 8, compile_top: int = 6, measure_steps: int = 0) -> Plan:
  """Enumerates layouts, estimates them, keeps those that fit, ranks by step time.

  measure_steps > 0 (present devices): the compiled candidates that fit are also run, and
  their measured step time and peak memory are kept beside the prediction; the ranking
  stays the prediction's, so the table shows whether the first choice was the fastest."""
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
  if target.calibration is not None:  # the rates the analytic ranking reads, in passes
    target.calibration.probe_all(matmuls=sorted({mlp_matmul(s, lay) for lay in layouts},
                                                key=str))
  ests = [analytic_estimate(s, lay, target) for lay in layouts]
  budget = MEMORY_HEADROOM * target.chip.memory
  ests.sort(key=lambda e: (e.memory > budget, e.step_s, e.memory))
  programs: dict = {}  # layout -> (build, compiled), kept for --measure
  if not target.described and compile_top:
    programs = {e.layout: compile_layout(cfg, vocab, e.layout, target)
                for e in ests[:compile_top]}
    if target.calibration is not None:
      policy = next(iter(programs.values()))[0].policy
      scan = bool(cfg.model.scan_layers)
      refs = probe_together(target.calibration, target.num_devices,
                            [compiled for _, compiled in programs.values()], policy, scan)
      # timed now on the steps just probed; each estimate below reads it back
      program_speed(target.calibration, target.num_devices, policy, scan, refs)
    ests[:compile_top] = [compiled_estimate(cfg, vocab, e.layout, target, s, programs)
                          for e in ests[:compile_top]]
    if not measure_steps:
      programs = {}
  for e in ests:
    e.fits = e.memory <= budget
  fitting = rank_fitting([e for e in ests if e.fits], target.described)
  if not fitting:
    raise NothingFits(nothing_fits_message(cfg, target, s, ests, remats, max_microbatches),
                      min(ests, key=lambda e: e.memory))
  rest = sorted((e for e in ests if not e.fits), key=lambda e: e.memory)
  alongside = None
  if measure_steps and not target.described:
    ran, alongside = measure_estimates(cfg, vocab, [e for e in fitting if e.source != "analytic"],
                                       target, measure_steps, programs)
    fitting = ran + [e for e in fitting if e.source == "analytic"]
  return Plan(target, fitting + rest, s, alongside)


def rank_fitting(ests: list[Estimate], described: bool) -> list[Estimate]:
  """The fitting estimates, first choice first: by predicted step time (on present devices
  the compiled and priced ones before those only estimated analytically), ties by memory.

  Priced predictions closer than PRICE_TIE to the fastest are not told apart: the first
  choice among them is the one whose step runs the fewest collectives, each a rendezvous
  that a slow device holds up. On the baby shakespeare shape (2 CPU devices) the
  data-parallel and fully sharded 4-microbatch layouts (1 and 32 collectives per step) are
  priced a fraction of a percent apart and measured 0.94-1.04x of each other (data-parallel
  over fully sharded, twelve runs): which is faster in a run is the machine's noise, and the
  fully sharded one, chosen where it was priced 0.01% lower, ran 1.07x the other."""
  ranked = sorted(ests, key=lambda e: (e.source == "analytic" and not described, e.step_s,
                                       e.memory))
  if not ranked or ranked[0].priced is None:
    return ranked
  tied = [e for e in ranked
          if e.priced is not None and e.step_s <= ranked[0].step_s * (1 + PRICE_TIE)]
  first = min(tied, key=lambda e: (e.priced.collectives, e.step_s, e.memory))
  return [first] + [e for e in ranked if e is not first]


def nothing_fits_message(cfg, target: Target, s: ModelShape, ests: list[Estimate],
                         remats: Sequence[str], max_microbatches: int) -> str:
  """Says how far off the smallest layout is and what would fit (analytic model)."""
  smallest = min(ests, key=lambda e: e.memory)
  budget = MEMORY_HEADROOM * target.chip.memory
  gib = budget / GiB
  lines = [f"nothing fits in {gib:.2f} GiB per device on {target.num_devices} x "
           f"{target.chip.name}: the smallest layout {format_layout(smallest.layout)} needs "
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


def format_layout(l: Layout) -> str:
  return (f"(data={l.data}, fsdp={l.fsdp}, tensor={l.tensor}, microbatches={l.microbatches},"
          f" remat={l.remat})")


def alongside_summary(plan: Plan) -> str:
  """The speed of `--measure`'s rounds that the `est alongside` predictions read: prices
  probed in those rounds, and the reference steps' factor and wait at them."""
  factor, wait_s = plan.alongside
  return (f"est alongside: prices probed and reference steps timed with the candidates: "
          f"step factor {factor:.3f}, {1e6 * wait_s:.0f} us per collective")


def tie_note(plan: Plan) -> str | None:
  """Why rank 1 is not the fastest estimate, where `rank_fitting`'s tie rule chose it."""
  fitting = [e for e in plan.estimates if e.fits and e.priced is not None]
  if len(fitting) < 2 or fitting[0] is not plan.best:
    return None
  fastest = min(fitting, key=lambda e: e.step_s)
  if fastest is plan.best:
    return None
  return (f"rank 1 within {100 * PRICE_TIE:.0f}% of the fastest estimate "
          f"(rank {plan.estimates.index(fastest) + 1}) with fewer collectives per step "
          f"({plan.best.priced.collectives:.0f} against {fastest.priced.collectives:.0f})")


def summary_lines(plan: Plan) -> list[str]:
  """The lines the table prints above its rows about how the plan was measured and chosen,
  which `lmos plan --json` prints on stderr."""
  lines = [alongside_summary(plan) if plan.alongside is not None else None, tie_note(plan)]
  return [line for line in lines if line is not None]


def format_table(plan: Plan, limit: int = 20) -> str:
  t = plan.target
  tokens = plan.shape.batch * plan.shape.seq_len
  head = (f"plan for {t.num_devices} x {t.chip.name} ({t.chip.memory / GiB:.1f} GiB each, "
          f"{100 * MEMORY_HEADROOM:.0f}% usable; "
          f"{'described target: analytic estimates' if t.described else 'present devices'})"
          f"; {plan.shape.params / 1e6:.1f}M params, batch {plan.shape.batch} x "
          f"{plan.shape.seq_len}")
  if t.calibration is not None:
    head += f"\nstep times from this machine's {t.calibration.describe()}"
  head += "".join("\n" + line for line in summary_lines(plan))
  measured = any(e.measured_step_s is not None for e in plan.estimates)
  extra = (" measured step ms | measured / est | est alongside ms | measured / that | "
           "measured peak GiB |") if measured else ""
  rows = [head, "| rank | data | fsdp | tensor | micro | remat | GiB/device | fits | "
          "est step ms | est tokens/s | source |" + extra,
          "|" + "---|" * (16 if measured else 11)]
  for i, e in enumerate(plan.estimates[:limit]):
    l = e.layout
    row = (f"| {i + 1 if e.fits else '-'} | {l.data} | {l.fsdp} | {l.tensor} | "
           f"{l.microbatches} | {l.remat} | {e.memory / GiB:.3f} | "
           f"{'yes' if e.fits else 'no'} | {1e3 * e.step_s:.2f} | "
           f"{tokens / e.step_s:,.0f} | {e.source} |")
    if measured:
      m = e.measured_step_s
      peak = "-" if e.measured_peak is None else f"{e.measured_peak / GiB:.3f}"
      a = e.predicted_alongside_s
      along = "- | -" if m is None or a is None else f"{1e3 * a:.2f} | {m / a:.2f}"
      row += (f" {1e3 * m:.2f} | {m / e.step_s:.2f} | {along} | {peak} |" if m is not None
              else " - | - | - | - | - |")
    rows.append(row)
  if len(plan.estimates) > limit:
    rows.append(f"... {len(plan.estimates) - limit} more layouts")
  return "\n".join(rows)


def measured_best(plan: Plan) -> Estimate | None:
  """The measured fastest candidate (None when nothing was measured)."""
  ran = [e for e in plan.estimates if e.measured_step_s is not None]
  return min(ran, key=lambda e: e.measured_step_s) if ran else None


def plan_json(plan: Plan, chosen: Estimate) -> list[dict]:
  """`lmos plan --json`: one object per candidate, predicted and (with --measure) measured."""
  return [{"overrides": e.layout.overrides(), "fits": e.fits, "source": e.source,
           "predicted_step_s": e.step_s, "measured_step_s": e.measured_step_s,
           "predicted_alongside_step_s": e.predicted_alongside_s,
           "predicted_peak_bytes": e.memory, "measured_peak_bytes": e.measured_peak,
           "chosen": e is chosen} for e in plan.estimates]


def override_flags(overrides: dict[str, Any]) -> str:
  return " ".join(f"--config.{k}={v}" for k, v in overrides.items())
