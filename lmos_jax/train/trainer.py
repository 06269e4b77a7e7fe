"""`lmos train`: the training loop around the pure step, with eval, logging and checkpoints.

`train()` is a list of events: set up the host (`setup_host`), build the run (`build_run`:
validation, data, mesh, `assemble_step`), restore or initialise the state (the init program
and the first train call compiling meanwhile in background threads: `compile_ahead`, both
traced once per machine through the `ProgramStore`), loop over jitted
calls (`train_loop`: metrics through `MetricLog`, checkpoints through the `Checkpointer`),
and finish (`finish`: the adapters file, the end-of-run sample).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
from flax import nnx

import lmos_jax
from lmos_jax.config.loading import ConfigError, validate
from lmos_jax.config.plan_file import apply_plan
from lmos_jax.config.schema import base_config
from lmos_jax.data.build import build_data
from lmos_jax.data.encoder import MLMData, build_cls_data, resolve_epochs
from lmos_jax.data.interactions import build_rec_data
from lmos_jax.data.stream import batch_stream, data_state, restore_data_state
from lmos_jax.data.tokenizer import check_vocab
from lmos_jax.errors import UserError
from lmos_jax.models.decode import Decoder, Sampling
from lmos_jax.models.gpt import count_params
from lmos_jax.parallel import distributed
from lmos_jax.parallel.compile_cache import CompileAhead, enable_compile_cache
from lmos_jax.parallel.host_cpu import split_cpu_host_for
from lmos_jax.parallel.host_memory import setup_cpu_allocator
from lmos_jax.parallel.program_store import SUBDIR as PROGRAMS_SUBDIR
from lmos_jax.parallel.program_store import ProgramStore
from lmos_jax.parallel.sharding import abstract_like, batch_sharding, make_mesh
from lmos_jax.peft.wrap import save_adapters, trainable_report
from lmos_jax.train.assemble import assemble_step
from lmos_jax.train.init_from import pretrained_train_state
from lmos_jax.train.checkpoint import (Checkpointer, CheckpointError, NonFiniteError,
                                      NonFiniteMonitor, PreemptionGuard, check_writable,
                                      drop_metric_rows_after, restore_latest_good, state_nbytes)
from lmos_jax.train.metrics import MetricWriter, device_peak_flops, flops_per_token
from lmos_jax.train.precision import auto_precision
from lmos_jax.train.sparse_quant import run_layouts, setup_line, sparsity_line, wants_kernels
from lmos_jax.train.step import (StepConfig, jit_eval_step, jit_train_step,
                                 stacked_batch_sharding)
from lmos_jax.train.tracking import Tracker, check_tracking
from lmos_jax.train.wallclock import WallClock, process_age
from lmos_jax.train.wallclock import describe as describe_wall
from lmos_jax.workdir import (WALL_TIME, checkpoint_steps, write_config, write_items,
                              write_labels, write_tokenizer)


@dataclasses.dataclass
class Run:
  """Everything a training run is built from, before any step runs."""

  cfg: Any
  mesh: Any
  data: Any
  graphdef: Any
  init_fn: Any
  abstract_state: Any
  shardings: dict
  step_cfg: StepConfig
  num_params: int
  trainable: Any = None  # PEFT: predicate on param paths (None: everything trains)


def setup_host(cfg) -> None:
  """What every process does before JAX touches a device: split a CPU host into devices,
  set the allocator policy, join the other hosts, agree on the config, and point JAX at the
  persistent compilation cache."""
  cpu_devices = split_cpu_host_for(cfg)
  retained = setup_cpu_allocator(cfg, cpu_devices or 1)  # before JAX starts its threads
  distributed.initialize(cfg.distributed)  # multi-host: joins before any device is touched
  distributed.check_same_config(cfg)
  check_tracking(cfg.tracking)
  cache = enable_compile_cache(cfg.train.compile_cache)
  if jax.process_index() == 0:
    print(f"lmos train: {host_setup_line(cfg, cpu_devices, retained)}; {cache}", flush=True)


def host_setup_line(cfg, cpu_devices: int | None, retained: bool) -> str:
  """What the host set-up chose and why, in one line (the choices themselves are made by
  parallel.host_cpu.split_cpu_host and parallel.host_memory)."""
  devices = jax.local_devices()
  kind = f"{len(devices)} {devices[0].platform} device(s) on this process"
  if devices[0].platform != "cpu":
    why = "the accelerator's own"
  elif cpu_devices:
    why = (f"this host's cores split by mesh.cpu_devices={cfg.mesh.cpu_devices or 'auto'}")
  else:
    why = "as XLA_FLAGS or an earlier JAX start set them"
  malloc = ("malloc keeps freed memory" if retained else "default malloc") + \
      f" (mesh.cpu_allocator={cfg.mesh.get('cpu_allocator', 'auto')})"
  return f"host: {kind}, {why}; {malloc}"


def build_task_data(cfg, workdir=None):
  """This host's data for `cfg.task`: LM windows, MLM-masked windows, TSV classes or users'
  item histories."""
  if cfg.task == "rec":
    return build_rec_data(cfg, jax.process_index(), jax.process_count())
  if cfg.task == "cls":  # sentence(-pair) classification from TSV files
    return build_cls_data(cfg, jax.process_index(), jax.process_count())
  data = build_data(cfg, jax.process_index(), jax.process_count(), workdir)  # BPE cache
  if cfg.task == "mlm":  # BERT masking over the pipeline's windows (adds [MASK] if needed)
    data = MLMData(data, cfg.data.mlm_prob, cfg.seed)
  return data


def build_run(cfg, devices=None, workdir=None) -> Run:
  """Validates the config, builds data, mesh, model layout and step config (no compile)."""
  devices = jax.devices() if devices is None else devices
  resolve_epochs(cfg)  # cls: train.epochs -> train.steps, checked by validate like given steps
  validate(cfg, len(devices), jax.process_count())
  data = build_task_data(cfg, workdir)
  check_vocab(data.tokenizer, cfg.model.vocab_size)  # every id needs an embedding row
  mesh = make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), devices)
  step = assemble_step(cfg, mesh, data.tokenizer.vocab_size, item_text_for(cfg, data))
  return Run(cfg, mesh, data, step.graphdef, step.init_fn, step.abstract, step.shardings,
             step.step_cfg, count_params(step.abstract["params"]), step.step_cfg.trainable)


def item_text_for(cfg, data) -> np.ndarray | None:
  """Task rec with text: the encoder's vectors of every catalogue item (rows 1..N; row 0
  padding), computed once per run; sets model.text_dim to the encoder's width."""
  if cfg.task != "rec" or cfg.model.item_repr == "id":
    return None
  from lmos_jax.models.hf import minilm_dir
  from lmos_jax.models.rec import item_text_table
  table = item_text_table(cfg.model.text_encoder or str(minilm_dir()), data.catalogue.texts)
  if cfg.model.text_dim not in (0, table.shape[1]):
    raise ConfigError(f"config 'model.text_dim'={cfg.model.text_dim} but the encoder "
                      f"gives {table.shape[1]}-wide vectors; set it to 0 or {table.shape[1]}")
  cfg.model.text_dim = table.shape[1]
  return table


def jit_steps(run: Run):
  """(train call, eval step), jitted for this run's batch layout; compiled at first use.

  A train call runs `train.steps_per_call` optimizer steps.
  """
  ndims = {k: v.ndim for k, v in run.data.train_batch(0).items()}
  train_fn = jit_train_step(run.step_cfg, run.shardings, run.mesh, ndims,
                            steps_per_call=run.cfg.train.steps_per_call)
  eval_fn = jit_eval_step(run.step_cfg, run.shardings["params"], run.mesh, ndims)
  return train_fn, eval_fn


def batch_layout(run: Run, v: np.ndarray, stacked: bool = False):
  """(sharding, global shape) of the global array assembled from this host's rows `v`."""
  if stacked:
    return (stacked_batch_sharding(run.mesh, v.ndim),
            (v.shape[0], v.shape[1] * jax.process_count(), *v.shape[2:]))
  return batch_sharding(run.mesh, v.ndim), (v.shape[0] * jax.process_count(), *v.shape[1:])


def global_batch(run: Run, local: dict[str, np.ndarray],
                 stacked: bool = False) -> dict[str, jax.Array]:
  """Assembles the global batch from this host's rows (works for one or many processes).

  stacked: arrays are (k, rows, ...), k steps' batches for one call (train.steps_per_call).
  """
  out = {}
  for k, v in local.items():
    sh, global_shape = batch_layout(run, v, stacked)
    out[k] = jax.make_array_from_process_local_data(sh, v, global_shape)
  return out


def stack_call(local: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """k steps' batches stacked on a leading axis, zero-padded to the widest (length buckets:
  widths may differ)."""
  width = max(b["inputs"].shape[1] for b in local)
  return {key: np.stack([pad_columns(b[key], width) for b in local]) for key in local[0]}


def next_call_batch(run: Run, batches, k: int) -> dict[str, jax.Array]:
  """The next call's global batch: one step's, or k steps' stacked on a leading axis."""
  if k == 1:
    return global_batch(run, next(batches))
  return global_batch(run, stack_call([next(batches) for _ in range(k)]), stacked=True)


def call_batch_spec(run: Run, start: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes, dtypes and shardings of the global batch of the call starting at `start`."""
  k = run.cfg.train.steps_per_call
  local = (run.data.train_batch(start) if k == 1
           else stack_call([run.data.train_batch(s) for s in range(start, start + k)]))
  specs = {}
  for key, v in local.items():
    sh, shape = batch_layout(run, v, stacked=k > 1)
    specs[key] = jax.ShapeDtypeStruct(shape, v.dtype, sharding=sh)
  return specs


def pad_columns(v: np.ndarray, width: int) -> np.ndarray:
  """A (rows, T) token array zero-padded to `width` columns (per-row arrays unchanged). The
  added columns have attention_mask 0, so they change nothing the step computes."""
  if v.ndim != 2 or v.shape[1] == width:
    return v
  return np.pad(v, ((0, 0), (0, width - v.shape[1])))


def unstack_metrics(last_step: int, metrics: dict, k: int) -> list[tuple[int, dict]]:
  """(step, metrics) per step from one call's metrics (stacked (k,) when k > 1)."""
  if k == 1:
    return [(last_step, metrics)]
  return [(last_step - k + 1 + i, {key: v[i] for key, v in metrics.items()}) for i in range(k)]


def init_or_restore(run: Run, ckpt: Checkpointer, init_ahead: CompileAhead | None = None
                    ) -> tuple[dict, dict]:
  """Newest checkpoint that reads back intact (checked against this config), else fresh init
  (by the program `init_ahead` compiled, when given).

  Corrupt or truncated newer steps are reported, moved aside, and an older good one is used.
  A checkpoint of another model or other data is refused (a UserError naming the workdir)
  from its metadata, before its arrays are read.
  """
  def same_run(step: int, meta: dict) -> None:
    saved_model = json.loads(meta.get("config", "{}")).get("model")
    now_model = json.loads(run.cfg.to_json())["model"]
    if saved_model is not None and saved_model != now_model:
      changed = sorted(k for k in set(saved_model) | set(now_model)
                       if saved_model.get(k) != now_model.get(k))
      raise ConfigError(f"--workdir={ckpt.workdir} holds a checkpoint (step {step}) of a "
                        f"different model (changed: {', '.join('model.' + k for k in changed)})"
                        "; use a fresh --workdir or the original model settings")
    changed = pruning_changes(json.loads(meta.get("config", "{}")), json.loads(run.cfg.to_json()))
    if changed:
      raise ConfigError(f"--workdir={ckpt.workdir} holds a checkpoint (step {step}) trained "
                        f"with other pruning settings (changed: {', '.join(changed)}); resume "
                        "with the original prune settings or use a fresh --workdir")
    restore_data_state(run.data, meta.get("data_state"), step)  # same data, same position

  step, state, meta = restore_latest_good(
      ckpt, abstract_like(run.abstract_state, run.shardings), same_run)
  if step is None:
    key = jax.random.PRNGKey(run.cfg.seed)
    with jax.set_mesh(run.mesh):
      state = init_ahead.compiled()(key) if init_ahead else init_program(run)(key)
    if run.cfg.model.init_from:  # pretrained weights (HF folder) into the fresh sharded state
      state = pretrained_train_state(run.cfg, state, run.shardings, run.step_cfg.tx, run.mesh)
    return state, {}
  return state, meta


def pruning_changes(saved: dict, now: dict) -> list[str]:
  """The prune fields a resume would change ([] when it may resume).

  The masks and the pruning schedule's position are optimizer state, so a pruned run
  resumes with its own settings only; runs that both prune nothing may differ in unused
  knobs. A saved config without the block (older runs) pruned nothing: the defaults."""
  before = saved.get("prune") or json.loads(base_config().to_json())["prune"]
  after = now["prune"]
  if before.get("method") == after["method"] == "none":
    return []
  return sorted(f"prune.{k}" for k in set(before) | set(after) if before.get(k) != after.get(k))


def first_step(state: dict, steps_per_call: int) -> int:
  """The step the state is at; a resume must start on a call boundary."""
  start = int(jax.device_get(state["step"]))
  if start % steps_per_call:
    raise ConfigError(f"the checkpoint restored at step {start} is not a multiple of "
                      f"'train.steps_per_call'={steps_per_call}; resume with a steps_per_call "
                      f"that divides {start} (metrics and checkpoints fall between calls)")
  return start


def evaluate(run: Run, eval_fn, params) -> dict[str, float]:
  loss_sum = weight = correct = 0.0
  for b in run.data.val_batches():
    out = jax.device_get(eval_fn(params, global_batch(run, b)))
    loss_sum += float(out["loss_sum"])
    weight += float(out["weight"])
    correct += float(out["correct"])
  return {"eval_loss": loss_sum / max(weight, 1.0), "eval_accuracy": correct / max(weight, 1.0)}


def save_side_files(run: Run, workdir: Path) -> None:
  """config.json, tokenizer.json and (classifiers) labels.json beside the checkpoints: what
  generate, predict, convert and compress read back through lmos_jax.workdir."""
  if jax.process_index() != 0:
    return
  write_config(workdir, run.cfg)
  if run.cfg.task == "rec":  # the catalogue: item ids, texts and training counts
    write_items(workdir, run.data.catalogue)
    return
  write_tokenizer(workdir, run.data.tokenizer)
  if hasattr(run.data, "label_set"):  # classification: names for `lmos predict`
    write_labels(workdir, run.data.label_set)


class MetricLog:
  """The loop's metrics: what each call returns stays on the device until a log point, then
  is fetched in one transfer; throughput, MFU and the input-wait share are computed there,
  the eval runs at eval points, and the row goes to metrics.jsonl/TensorBoard and the tracker.

  The non-finite monitor sees every step, in order, at each fetch (before any checkpoint).
  """

  def __init__(self, run: Run, workdir: Path, start: int, meta: dict, eval_fn,
               monitor: NonFiniteMonitor, clock: WallClock, peak: tuple[float, str],
               programs: str = ""):
    from tqdm import tqdm
    cfg, t = run.cfg, run.cfg.train
    self.run, self.eval_fn, self.monitor = run, eval_fn, monitor
    self.start, self.per_call = start, t.steps_per_call
    is_main = jax.process_index() == 0
    self.writer = MetricWriter(workdir, enabled=is_main)
    self.tracker = Tracker(cfg, workdir, jax.process_index())
    if start == 0:
      self.writer.write_text("config", cfg.to_json(indent=2), 0)  # hyperparameters, once
    self.tokens_per_step = t.batch_size * cfg.data.seq_len  # at full width (no buckets)
    self.flops_token = flops_per_token(model_tcfg(run), cfg.data.seq_len,
                                       lm_head=cfg.task != "cls")
    self.peak, self.peak_src = peak  # (FLOP/s, where the number came from)
    self.tokens_seen = int(meta.get("tokens_seen", start * self.tokens_per_step))
    self.wall0 = time.time() - float(meta.get("wall_time", 0.0))
    self.pbar = tqdm(total=t.steps, initial=start, disable=not (t.progress and is_main),
                     dynamic_ncols=True, file=sys.stderr)
    self.pending: list[tuple[int, dict]] = []  # (last step of a call, device metrics)
    self.last: dict[str, float] = {}  # the newest fetched metrics (+ eval)
    self.mark_time: float | None = None  # the clock starts after the first call compiles
    self.clock = clock  # where the run's wall time goes (train() started it)
    self.programs = programs  # what the program store did ("" when nothing)
    self.mark_wait, self.mark_tokens = 0.0, self.tokens_seen

  def record(self, step: int, metrics: dict, tokens: int) -> None:
    """A call ending at `step` was dispatched; its metrics stay on the device for now.

    tokens: positions the call computed (its batches' padded width, which length buckets
    make vary), so tokens/s and MFU count the work really done."""
    self.tokens_seen += tokens
    self.pbar.update(self.per_call)
    self.pending.append((step, metrics))
    if len(self.pending) > 1:
      # At most two calls in flight. Unbounded dispatch deadlocked XLA's CPU collectives
      # (2 cores, 2+ devices: an all-reduce rendezvous never completes), and one call of
      # look-ahead already keeps any device busy. Waiting fetches nothing.
      jax.block_until_ready(self.pending[-2][1]["loss"])

  def due(self, step: int) -> bool:
    """Metrics are fetched at the first call (to start the clock after compiling), at log
    and eval points and at checkpoints (the monitor must have seen every step before a
    save)."""
    t = self.run.cfg.train
    return (step == self.start + self.per_call or step % t.log_every == 0
            or step % t.eval_every == 0 or step % t.ckpt_every == 0 or step == t.steps)

  def flush(self, params, wait_seconds: float) -> None:
    """Fetches every pending call's metrics at once; logs the newest step at log and eval
    points.

    `wait_seconds`: the input pipeline's total blocking time so far (`BatchStream`).
    """
    t = self.run.cfg.train
    calls = jax.device_get([m for _, m in self.pending])
    per_step = [sm for (s, _), m in zip(self.pending, calls)
                for sm in unstack_metrics(s, m, self.per_call)]
    self.pending.clear()
    for i, (s, m) in enumerate(per_step):
      self.monitor.update(s, float(m.get("nonfinite", 0.0)) > 0)
      if self.monitor.exhausted:  # the run stops here: later steps are neither counted nor logged
        per_step = per_step[:i + 1]
        break
    step, m = per_step[-1][0], {k: float(v) for k, v in per_step[-1][1].items()}
    m.update(self.rates(step, wait_seconds))
    m["skipped_steps"] = float(self.monitor.total)
    self.last = m
    self.pbar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_sec']:,.0f}")
    evals = step % t.eval_every == 0 or step == t.steps
    if step % t.log_every == 0 or evals:  # an eval step is logged whatever log_every says
      row = dict(m)
      if evals:
        with self.clock.measure("eval"):
          row.update(evaluate(self.run, self.eval_fn, params))
        self.last.update(row)
      self.writer.write(step, row)
      self.tracker.log(step, row)
      self.mark_time, self.mark_wait = time.perf_counter(), wait_seconds
      self.mark_tokens = self.tokens_seen

  def rates(self, step: int, wait_seconds: float) -> dict[str, float]:
    """Tokens/s, MFU and the share of time blocked on the input pipeline since the last
    log point (NaN at the first fetch, whose time includes compiling)."""
    now = time.perf_counter()
    if self.mark_time is None:
      self.mark_time, self.mark_wait = now, wait_seconds
      self.mark_tokens = self.tokens_seen
      if jax.process_index() == 0:
        said = f"; {self.programs}" if self.programs else ""
        print(f"lmos train: first step done {self.clock.elapsed():.1f} s after start "
              f"(set-up, data, restore, compile{said})", flush=True)
      self.clock.switch("steps")
      nan = float("nan")
      return {"tokens_per_sec": nan, "data_wait_frac": nan, "mfu": nan}
    elapsed = max(now - self.mark_time, 1e-9)
    rate = (self.tokens_seen - self.mark_tokens) / elapsed
    return {"tokens_per_sec": rate,
            "data_wait_frac": (wait_seconds - self.mark_wait) / elapsed,
            "mfu": rate * self.flops_token / self.peak}

  def wall_time(self) -> float:
    return time.time() - self.wall0

  def close(self, state) -> None:
    self.pbar.close()
    self.tracker.close(state)
    self.writer.close()


@dataclasses.dataclass
class LoopEnd:
  """Where the loop stopped."""

  step: int  # the last step run
  saved_step: int  # the newest checkpoint written (or restored from)
  stopped_by: str | None = None  # the signal (SIGTERM, SIGINT, preemption) that stopped it


def save_checkpoint(run: Run, ckpt: Checkpointer, step: int, state: dict, log: MetricLog,
                    force: bool = False) -> int:
  """Saves `state` with its metadata (tokens, wall time, data position); returns the step."""
  t = run.cfg.train
  best = {t.best_metric: log.last[t.best_metric]} if t.best_metric in log.last else None
  meta = _meta(run.cfg, step, log.tokens_seen, log.wall_time(), log.monitor.total,
               data_state(run.data, step))
  with log.clock.measure("checkpoint"):
    ckpt.save(step, state, meta, metrics=best, force=force)
  return step


def train_loop(run: Run, state: dict, start: int, train_fn, log: MetricLog,
               ckpt: Checkpointer, ahead: CompileAhead | None = None) -> tuple[dict, LoopEnd]:
  """Calls the step to train.steps: metrics at log points, checkpoints at ckpt points, a
  last checkpoint and a clean exit on SIGTERM/SIGINT/preemption.

  ahead: the train call's compile started during set-up; waited for before the first call."""
  t, k = run.cfg.train, run.cfg.train.steps_per_call
  batches = batch_stream(run.data, start, t.steps, run.cfg.data.prefetch)
  end = LoopEnd(start, start)
  log.clock.switch("first_step")  # until the first call's metrics are fetched: compile + run
  if ahead is not None:
    ahead.wait()
  with jax.set_mesh(run.mesh), PreemptionGuard() as guard:
    while end.step < t.steps:
      batch = next_call_batch(run, batches, k)  # prefetched: the batches from end.step
      with log.tracker.step_context(end.step, k):
        state, metrics = train_fn(state, batch)
      end.step += k
      log.tracker.after_step(end.step, state)
      log.record(end.step, metrics, int(np.prod(batch["inputs"].shape)))
      if log.due(end.step):
        log.flush(state["params"], batches.wait_seconds)
      if log.monitor.exhausted:  # too many non-finite steps: stop before saving anything newer
        break
      if end.step % t.ckpt_every == 0 or end.step == t.steps:
        end.saved_step = save_checkpoint(run, ckpt, end.step, state, log)
      if guard.should_stop(end.step, ckpt, k):  # save, wait for the write, exit 0
        if log.pending:
          log.flush(state["params"], batches.wait_seconds)
        if end.saved_step != end.step and not log.monitor.exhausted:
          end.saved_step = save_checkpoint(run, ckpt, end.step, state, log, force=True)
        end.stopped_by = guard.received
        break
  log.clock.switch("finish")
  return state, end


def finish(run: Run, workdir: Path, state: dict, end: LoopEnd, ckpt: Checkpointer,
           monitor: NonFiniteMonitor, clock: WallClock) -> dict[str, float]:
  """After the loop: the adapters file (PEFT), the non-finite stop, the preemption notice,
  or the achieved sparsity (pruning) and the end-of-run sample.

  Returns end-of-run figures for the run's last metrics ({"sparsity": s} when pruning)."""
  cfg, is_main = run.cfg, jax.process_index() == 0
  if cfg.peft.method != "full" and end.stopped_by is None:
    host = distributed.host_params(state["params"])  # a collective: every process
    if is_main:  # adapters (+ head) only: applied on top of model.init_from at load
      save_adapters(str(workdir / "adapters.safetensors"), host, run.trainable,
                    {"step": str(end.step), "peft.method": cfg.peft.method,
                     "model.init_from": cfg.model.init_from})
  if monitor.exhausted:
    raise monitor.error(monitor.last_step)
  if end.stopped_by is not None:
    if is_main:
      print(f"lmos train: stopped by {end.stopped_by} at step {end.step}; checkpoint saved in "
            f"{ckpt.step_dir(end.saved_step)}. Rerun the same command to resume.", flush=True)
    return {}
  figures = {}
  if cfg.prune.method != "none":
    figures["sparsity"] = report_sparsity(run, state)
  t = cfg.train
  if t.sample_tokens > 0:
    with clock.measure("sample"):
      host_params = distributed.host_params(state["params"])  # a collective: every process
      if is_main:
        text = sample_text(run, host_params, t.sample_prompt, t.sample_tokens, cfg.seed)
        print("--- sample ---\n" + text + "\n--------------", flush=True)
  return figures


def report_sparsity(run: Run, state: dict) -> float:
  """Prints (process 0) the share of exactly-zero weights over the pruned kernels."""
  host = distributed.host_params(state["params"])  # a collective: every process
  line, sparsity = sparsity_line(run.cfg.prune, host, run_layouts(run.graphdef, host))
  if jax.process_index() == 0:
    print(f"lmos train: {line}", flush=True)
  return sparsity


def train(cfg, workdir: str | Path, started_ago: float = 0.0) -> dict[str, Any]:
  """Runs (or resumes) training to cfg.train.steps; returns the last logged metrics.

  started_ago: seconds the process ran before this call, counted as start-up (`lmos train`
  passes its process's age, so start-up includes the interpreter and the imports)."""
  clock = WallClock(already=started_ago)
  workdir = Path(workdir)
  for line in apply_plan(cfg):  # before the host set-up: a plan may set mesh.cpu_devices
    print(f"lmos train: plan sets {line}", flush=True)
  setup_host(cfg)
  run = build_run(cfg, workdir=workdir)
  check_writable(workdir / "checkpoints", state_nbytes(run.abstract_state))
  t = cfg.train
  ckpt = Checkpointer(workdir, keep=t.keep_checkpoints, async_save=t.async_checkpoint,
                      keep_best=t.keep_best, best_metric=t.best_metric, best_mode=t.best_mode)
  # the CPU peak probe times matmuls: it runs before the compile below takes a core
  peak = device_peak_flops(cache_dir=jax.config.jax_compilation_cache_dir,
                           bf16=run.step_cfg.policy.bf16_operands)
  train_fn, eval_fn = jit_steps(run)
  store = program_store(run)
  saved = checkpoint_steps(workdir)
  init_ahead = None if saved else init_compile_ahead(run, store)  # a fresh start is certain
  train_fn, ahead = compile_ahead(run, train_fn, saved, store)
  state, meta = init_or_restore(run, ckpt, init_ahead)
  start = first_step(state, t.steps_per_call)
  if jax.process_index() == 0:  # rows logged after the restored step are recomputed, bit for bit
    drop_metric_rows_after(workdir / "metrics.jsonl", start)
  monitor = NonFiniteMonitor(t.nonfinite, t.max_bad_steps, int(meta.get("skipped_steps", 0)))
  save_side_files(run, workdir)
  log = MetricLog(run, workdir, start, meta, eval_fn, monitor, clock, peak, store.summary())
  announce(run, start, log)
  state, end = train_loop(run, state, start, train_fn, log, ckpt, ahead)
  log.close(state)
  with clock.measure("checkpoint"):
    ckpt.close()  # waits: every save issued above is complete (or raised) from here on
  try:
    log.last.update(finish(run, workdir, state, end, ckpt, monitor, clock))
  finally:
    report_wall_time(workdir, clock, end.step)
  return log.last


def program_store(run: Run) -> ProgramStore:
  """The store of traced programs, in the compile cache's directory; none (every program
  traced as usual) without a cache or across several processes."""
  cache = jax.config.jax_compilation_cache_dir
  directory = (Path(cache) / PROGRAMS_SUBDIR
               if cache and jax.config.jax_enable_compilation_cache and
               jax.process_count() == 1 else None)
  parts = {"config": run.cfg.to_json(), "policy": run.step_cfg.policy.name,
           "vocab_size": run.data.tokenizer.vocab_size}
  return ProgramStore(directory, parts)


def init_program(run: Run):
  """The fresh state's program: params from the seed, optimizer state, step 0."""
  return jax.jit(run.init_fn, out_shardings=run.shardings)


def init_compile_ahead(run: Run, store: ProgramStore) -> CompileAhead:
  """Starts compiling the init program now, so that its compile (or its read back from the
  cache) overlaps the train call's tracing.

  Not stored for recommenders with item text: their init program holds the item vectors."""
  fn = init_program(run)
  key_spec = (jax.eval_shape(jax.random.PRNGKey, 0),)
  if not (run.cfg.task == "rec" and run.cfg.model.item_repr != "id"):
    fn = store.jit("init", fn, key_spec, run.mesh)
  return CompileAhead(fn, key_spec, run.mesh)


def compile_ahead(run: Run, train_fn, saved_steps: list[int], store: ProgramStore
                  ) -> tuple[Any, CompileAhead | None]:
  """(train call, its compile started now): compiling while the state is initialised or
  restored.

  The call's batch shapes are taken at the step a resume would start from (the newest
  checkpoint; with length buckets the first call's width depends on it). When the restore
  lands elsewhere (a damaged newest checkpoint), or no step is left to run, the compiled
  program is simply unused: the loop compiles what it calls.
  """
  start = saved_steps[-1] if saved_steps else 0
  t = run.cfg.train
  if start >= t.steps or start % t.steps_per_call:
    return train_fn, None
  specs = (abstract_like(run.abstract_state, run.shardings), call_batch_spec(run, start))
  train_fn = store.jit("train_call", train_fn, specs, run.mesh, donate_argnums=(0,))
  return train_fn, CompileAhead(train_fn, specs, run.mesh)


def report_wall_time(workdir: Path, clock: WallClock, step: int) -> None:
  """Prints where this invocation's wall time went and appends it to wall_time.jsonl
  (one row per `lmos train`, resumes included), on process 0."""
  if jax.process_index() != 0:
    return
  parts = clock.breakdown()
  print(f"lmos train: {describe_wall(parts)}", flush=True)
  with open(workdir / WALL_TIME, "a") as f:
    f.write(json.dumps({"step": int(step), **{k: round(v, 4) for k, v in parts.items()}}) + "\n")


def announce(run: Run, start: int, log: MetricLog) -> None:
  """The run's one-line summary and its trainable share (process 0)."""
  if jax.process_index() != 0:
    return
  print(f"lmos train: {run.num_params:,} params, mesh {dict(run.mesh.shape)}, "
        f"precision {precision_text(run)}, peak {log.peak:.3g} FLOP/s ({log.peak_src}); "
        f"{'resuming at step ' + str(start) if start else 'fresh start'}", flush=True)
  print(f"lmos train: peft.method={run.cfg.peft.method}: "
        f"{trainable_report(run.abstract_state['params'], run.trainable)}", flush=True)
  if wants_kernels(run.cfg):
    print(f"lmos train: {setup_line(run.cfg)}", flush=True)


def precision_text(run: Run) -> str:
  """The policy's name, with why where `auto` chose it."""
  name = run.step_cfg.policy.name
  if run.cfg.train.precision != "auto":
    return name
  return f"{name} ({auto_precision(run.mesh.devices.flat[0].platform)[1]})"


def model_tcfg(run: Run):
  """The model's TransformerConfig (shapes only: nothing is allocated)."""
  model = nnx.eval_shape(lambda: nnx.merge(run.graphdef, run.abstract_state["params"]))
  return model.cfg


def _meta(cfg, step: int, tokens_seen: int, wall: float, skipped_steps: int = 0,
          data_state: dict | None = None) -> dict:
  return {"step": int(step), "tokens_seen": int(tokens_seen), "wall_time": float(wall),
          "skipped_steps": int(skipped_steps), "data_state": data_state or {},
          "config": cfg.to_json(), "versions": {"jax": jax.__version__, "flax": flax.__version__,
                                                "lmos_jax": lmos_jax.__version__}}


def sample_text(run: Run, params, prompt: str, num_tokens: int, seed: int) -> str:
  """The end-of-run sample, through the same compiled KV-cache decoder `lmos generate` uses.

  It stops early (status `cache_full`) when prompt plus sample outgrow the model's positions.
  """
  tok = run.data.tokenizer
  ids = [int(i) for i in tok.encode(prompt)] if prompt else []
  decoder = Decoder(run.graphdef, run.cfg.model.max_seq_len)
  out = decoder.generate(jax.device_get(params), [ids or [0]], num_tokens,
                         sampling=Sampling(temperature=0.8), seed=seed)
  return prompt + tok.decode(out.tokens[0])


def main(argv: list[str]) -> int:
  """`lmos train --config=FILE[:ARG] [--config.FIELD=VALUE ...] --workdir=DIR`.

  Bad input (flags, config, data, an incompatible checkpoint) raises UserError, which `lmos`
  prints as one line (exit 2); a checkpoint that cannot be written or read back exits 1,
  a failed multi-host join 3.
  """
  from absl import flags
  from lmos_jax.config.command_line import config_flag_values, parse_flags

  fv, rest = config_flag_values(argv)
  flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, logs)",
                      flag_values=fv)
  parse_flags(fv, rest)
  if not fv.workdir:
    raise ConfigError("--workdir is required: the run directory for checkpoints, metrics "
                      "and logs (an existing one resumes)")
  try:
    last = train(fv.config, fv.workdir, started_ago=process_age())
  except (CheckpointError, NonFiniteError) as e:
    if isinstance(e, UserError):
      raise
    print(f"lmos train: {e}", file=sys.stderr)
    return 1
  except distributed.DistributedError as e:
    print(f"lmos train: distributed error (process {jax.process_index()}): {e}",
          file=sys.stderr)
    return 3
  print(json.dumps({k: round(v, 5) for k, v in last.items()}), flush=True)
  return 0
