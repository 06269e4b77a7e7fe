"""`lmos train`: the training loop around the pure step, with eval, logging and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lmos_jax.config.loading import ConfigError, validate
from lmos_jax.data.build import build_data
from lmos_jax.data.stream import batch_stream, data_state, restore_data_state
from lmos_jax.errors import UserError
from lmos_jax.models.decode import Decoder, Sampling
from lmos_jax.models.factory import model_factory
from lmos_jax.models.gpt import count_params
from lmos_jax.parallel import distributed
from lmos_jax.parallel.host_memory import setup_cpu_allocator
from lmos_jax.parallel.sharding import batch_sharding, make_mesh
from lmos_jax.train.init_from import pretrained_train_state
from lmos_jax.train.checkpoint import (Checkpointer, CheckpointError, NonFiniteError,
                                      NonFiniteMonitor, PreemptionGuard, abstract_like,
                                      check_writable, drop_metric_rows_after,
                                      restore_latest_good, state_nbytes)
from lmos_jax.train.losses import lm_loss
from lmos_jax.train.metrics import MetricWriter, device_peak_flops, flops_per_token
from lmos_jax.train.optim import make_optimizer, make_schedule
from lmos_jax.train.precision import resolve_policy
from lmos_jax.train.step import (StepConfig, jit_eval_step, jit_train_step,
                                 stacked_batch_sharding, train_state_layout)
from lmos_jax.train.tracking import Tracker, check_tracking


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


def loss_for_task(task: str):
  if task == "lm":
    return lm_loss
  if task == "mlm":
    from lmos_jax.train.losses import mlm_loss
    return mlm_loss
  if task == "cls":
    from lmos_jax.train.losses import cls_loss
    return cls_loss
  raise ValueError(f"config 'task'={task!r}: expected lm, mlm or cls")


def build_run(cfg, devices=None, workdir=None) -> Run:
  """Validates the config, builds data, mesh, model layout and step config (no compile)."""
  devices = jax.devices() if devices is None else devices
  validate(cfg, len(devices))
  if cfg.task == "cls":  # sentence(-pair) classification from TSV files
    from lmos_jax.data.encoder import build_cls_data
    data = build_cls_data(cfg, jax.process_index(), jax.process_count())
  else:
    data = build_data(cfg, jax.process_index(), jax.process_count(), workdir)  # BPE cache
  if cfg.task == "mlm":  # BERT masking over the pipeline's windows (adds [MASK] if needed)
    from lmos_jax.data.encoder import MLMData
    data = MLMData(data, cfg.data.mlm_prob, cfg.seed)
  if cfg.model.vocab_size and data.tokenizer.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"the tokenizer has {data.tokenizer.vocab_size} ids but "
                     f"'model.vocab_size'={cfg.model.vocab_size}; raise it or set 0 (auto)")
  mesh = make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), devices)
  policy = resolve_policy(cfg.train.precision, devices[0].platform)
  from lmos_jax.peft import methods as peft
  make_model = peft.wrap_factory(model_factory(cfg.model, data.tokenizer.vocab_size), cfg.peft)
  trainable = peft.trainable_for(cfg.peft)  # frozen params: no grads, no optimizer state
  tx = peft.peft_optimizer(make_optimizer(cfg.train, trainable), cfg.peft, cfg.train.steps)
  graphdef, init_fn, abstract, shardings = train_state_layout(make_model, tx, policy, mesh)
  step_cfg = StepConfig(graphdef=graphdef, tx=tx, trainable=trainable,
                        loss_fn=peft.peft_loss(loss_for_task(cfg.task), cfg.peft),
                        policy=policy, microbatches=cfg.train.microbatches, l2=cfg.train.l2,
                        decay_embeddings=cfg.train.decay_embeddings,
                        decay_norms_and_biases=cfg.train.decay_norms_and_biases,
                        schedule=make_schedule(cfg.train))
  return Run(cfg, mesh, data, graphdef, init_fn, abstract, shardings, step_cfg,
             count_params(abstract["params"]), trainable)


def global_batch(run: Run, local: dict[str, np.ndarray],
                 stacked: bool = False) -> dict[str, jax.Array]:
  """Assembles the global batch from this host's rows (works for one or many processes).

  stacked: arrays are (k, rows, ...), k steps' batches for one call (train.steps_per_call).
  """
  out = {}
  for k, v in local.items():
    if stacked:
      sh = stacked_batch_sharding(run.mesh, v.ndim)
      global_shape = (v.shape[0], v.shape[1] * jax.process_count(), *v.shape[2:])
    else:
      sh = batch_sharding(run.mesh, v.ndim)
      global_shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
    out[k] = jax.make_array_from_process_local_data(sh, v, global_shape)
  return out


def next_call_batch(run: Run, batches, k: int) -> dict[str, jax.Array]:
  """The next call's global batch: one step's, or k steps' stacked on a leading axis."""
  if k == 1:
    return global_batch(run, next(batches))
  local = [next(batches) for _ in range(k)]
  return global_batch(run, {key: np.stack([b[key] for b in local]) for key in local[0]},
                      stacked=True)


def unstack_metrics(last_step: int, metrics: dict, k: int) -> list[tuple[int, dict]]:
  """(step, metrics) per step from one call's metrics (stacked (k,) when k > 1)."""
  if k == 1:
    return [(last_step, metrics)]
  return [(last_step - k + 1 + i, {key: v[i] for key, v in metrics.items()}) for i in range(k)]


def init_or_restore(run: Run, ckpt: Checkpointer) -> tuple[dict, dict]:
  """Newest checkpoint that reads back intact (checked against this config), else fresh init.

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
    restore_data_state(run.data, meta.get("data_state"), step)  # same data, same position

  step, state, meta = restore_latest_good(
      ckpt, abstract_like(run.abstract_state, run.shardings), same_run)
  if step is None:
    with jax.set_mesh(run.mesh):
      state = jax.jit(run.init_fn, out_shardings=run.shardings)(jax.random.PRNGKey(run.cfg.seed))
    if run.cfg.model.init_from:  # pretrained weights (HF folder) into the fresh sharded state
      state = pretrained_train_state(run.cfg, state, run.shardings, run.step_cfg.tx, run.mesh)
    return state, {}
  return state, meta


def evaluate(run: Run, eval_fn, params) -> dict[str, float]:
  loss_sum = weight = correct = 0.0
  for b in run.data.val_batches():
    out = jax.device_get(eval_fn(params, global_batch(run, b)))
    loss_sum += float(out["loss_sum"])
    weight += float(out["weight"])
    correct += float(out["correct"])
  return {"eval_loss": loss_sum / max(weight, 1.0), "eval_accuracy": correct / max(weight, 1.0)}


def save_side_files(run: Run, workdir: Path) -> None:
  """config.json and tokenizer.json beside the checkpoints, for generate/convert/compress."""
  if jax.process_index() != 0:
    return
  (workdir / "config.json").write_text(run.cfg.to_json(indent=2))
  tok = run.data.tokenizer
  if hasattr(tok, "describe"):  # lmos_jax.data.tokenizer.tokenizer_from_info reads it back
    info = tok.describe()
  else:
    info = {"kind": type(tok).__name__}
    if hasattr(tok, "chars"):
      info["chars"] = tok.chars
  (workdir / "tokenizer.json").write_text(json.dumps(info))
  if hasattr(run.data, "label_set"):  # classification: names for `lmos predict`
    (workdir / "labels.json").write_text(json.dumps(list(run.data.label_set)))


def train(cfg, workdir: str | Path) -> dict[str, Any]:
  """Runs (or resumes) training to cfg.train.steps; returns the last logged metrics."""
  from tqdm import tqdm

  workdir = Path(workdir)
  cpu_devices = distributed.split_cpu_host_for(cfg)
  setup_cpu_allocator(cfg, cpu_devices or 1)  # before JAX starts its threads
  distributed.initialize(cfg.distributed)  # multi-host: joins before any device is touched
  distributed.check_same_config(cfg)
  check_tracking(cfg.tracking)
  run = build_run(cfg, workdir=workdir)
  check_writable(workdir / "checkpoints", state_nbytes(run.abstract_state))
  is_main = jax.process_index() == 0
  t = cfg.train
  ckpt = Checkpointer(workdir, keep=t.keep_checkpoints, async_save=t.async_checkpoint,
                      keep_best=t.keep_best, best_metric=t.best_metric, best_mode=t.best_mode)
  state, meta = init_or_restore(run, ckpt)
  start = int(jax.device_get(state["step"]))
  per_call = t.steps_per_call
  if start % per_call:
    raise ConfigError(f"the checkpoint restored at step {start} is not a multiple of "
                      f"'train.steps_per_call'={per_call}; resume with a steps_per_call that "
                      f"divides {start} (metrics and checkpoints fall between calls)")
  if is_main:  # rows logged after the restored step are recomputed, bit for bit
    drop_metric_rows_after(workdir / "metrics.jsonl", start)
  monitor = NonFiniteMonitor(t.nonfinite, t.max_bad_steps, int(meta.get("skipped_steps", 0)))
  save_side_files(run, workdir)
  writer = MetricWriter(workdir, enabled=is_main)
  tracker = Tracker(cfg, workdir, jax.process_index())
  if start == 0:
    writer.write_text("config", cfg.to_json(indent=2), 0)  # hyperparameters, once per run
  ndims = {k: v.ndim for k, v in run.data.train_batch(0).items()}
  train_fn = jit_train_step(run.step_cfg, run.shardings, run.mesh, ndims,
                            steps_per_call=per_call)
  eval_fn = jit_eval_step(run.step_cfg, run.shardings["params"], run.mesh, ndims)
  tcfg = _model_tcfg(run)
  tokens_per_step = t.batch_size * cfg.data.seq_len
  flops_step = tokens_per_step * flops_per_token(tcfg, cfg.data.seq_len,
                                                 lm_head=cfg.task != "cls")
  peak, peak_src = device_peak_flops()
  if is_main:
    print(f"lmos train: {run.num_params:,} params, mesh {dict(run.mesh.shape)}, "
          f"precision {run.step_cfg.policy.name}, peak {peak:.3g} FLOP/s ({peak_src}); "
          f"{'resuming at step ' + str(start) if start else 'fresh start'}", flush=True)
    from lmos_jax.peft.wrap import trainable_report
    print(f"lmos train: peft.method={cfg.peft.method}: "
          f"{trainable_report(run.abstract_state['params'], run.trainable)}", flush=True)
  last: dict[str, Any] = {}
  tokens_seen = int(meta.get("tokens_seen", start * tokens_per_step))
  wall0 = time.time() - float(meta.get("wall_time", 0.0))
  pbar = tqdm(total=t.steps, initial=start, disable=not (t.progress and is_main),
              dynamic_ncols=True, file=sys.stderr)
  pending: list[tuple[int, dict]] = []  # (last step of a call, device metrics) not fetched
  mark_time, mark_step = None, start
  batches = batch_stream(run.data, start, t.steps, cfg.data.prefetch)
  mark_wait = 0.0

  def flush() -> None:
    """Fetches every pending step's metrics in one transfer; logs the newest at log points.

    Steps between log points never wait on the device: their metrics stay on it until here.
    The non-finite monitor still sees every step, in order, before any checkpoint is saved.
    """
    nonlocal last, mark_time, mark_step, mark_wait
    calls = jax.device_get([m for _, m in pending])
    per_step = [sm for (s, _), m in zip(pending, calls) for sm in unstack_metrics(s, m, per_call)]
    steps, fetched = [s for s, _ in per_step], [m for _, m in per_step]
    pending.clear()
    for i, (s, m) in enumerate(zip(steps, fetched)):
      monitor.update(s, float(m.get("nonfinite", 0.0)) > 0)
      if monitor.exhausted:  # the run stops here: later steps are neither counted nor logged
        steps, fetched = steps[:i + 1], fetched[:i + 1]
        break
    step, m = steps[-1], {k: float(v) for k, v in fetched[-1].items()}
    now = time.perf_counter()
    if mark_time is None:  # first step includes compilation: start the clock after it
      mark_time, mark_step, mark_wait = now, step, batches.wait_seconds
      rate = wait_frac = float("nan")
    else:
      rate = (step - mark_step) * tokens_per_step / max(now - mark_time, 1e-9)
      wait_frac = (batches.wait_seconds - mark_wait) / max(now - mark_time, 1e-9)
    m["tokens_per_sec"] = rate
    m["data_wait_frac"] = wait_frac  # share of step time blocked on the input pipeline
    m["mfu"] = rate / tokens_per_step * flops_step / peak if rate == rate else float("nan")
    m["skipped_steps"] = float(monitor.total)
    last = m
    pbar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{rate:,.0f}")
    if step % t.log_every == 0 or step == t.steps:
      row = dict(m)
      if step % t.eval_every == 0 or step == t.steps:
        row.update(evaluate(run, eval_fn, state["params"]))
        last.update(row)
      writer.write(step, row)
      tracker.log(step, row)
      mark_time, mark_step, mark_wait = time.perf_counter(), step, batches.wait_seconds

  def save(step: int, force: bool = False) -> None:
    nonlocal saved_step
    best = {t.best_metric: last[t.best_metric]} if t.best_metric in last else None
    ckpt.save(step, state, _meta(cfg, step, tokens_seen, time.time() - wall0, monitor.total,
                                 data_state(run.data, step)),
              metrics=best, force=force)
    saved_step = step

  saved_step, stopped_by = start, None
  with jax.set_mesh(run.mesh), PreemptionGuard() as guard:
    step = start
    while step < t.steps:
      batch = next_call_batch(run, batches, per_call)  # prefetched: the batches from `step`
      with tracker.step_context(step, per_call):
        state, metrics = train_fn(state, batch)
      step += per_call
      tracker.after_step(step, state)
      tokens_seen += tokens_per_step * per_call
      pbar.update(per_call)
      pending.append((step, metrics))
      if len(pending) > 1:
        # At most two steps in flight. Unbounded dispatch deadlocked XLA's CPU collectives
        # here (2 cores, 2+ devices: an all-reduce rendezvous never completes), and one step
        # of look-ahead already keeps any device busy. Waiting fetches nothing.
        jax.block_until_ready(pending[-2][1]["loss"])
      # Metrics are fetched only at the first step (to start the clock after compiling), log
      # points and checkpoints.
      if (step == start + per_call or step % t.log_every == 0 or step % t.ckpt_every == 0
          or step == t.steps):
        flush()
      if monitor.exhausted:  # too many non-finite steps: stop before saving anything newer
        break
      if step % t.ckpt_every == 0 or step == t.steps:
        save(step)
      if guard.should_stop(step, ckpt, per_call):  # SIGTERM/SIGINT/preemption: save, wait, exit 0
        if pending:
          flush()
        if saved_step != step and not monitor.exhausted:
          save(step, force=True)
        stopped_by = guard.received
        break
  pbar.close()
  tracker.close(state)
  ckpt.close()  # waits: every save issued above is complete (or raised) from here on
  writer.close()
  if run.trainable is not None and stopped_by is None:
    from lmos_jax.peft.wrap import save_adapters
    host = distributed.host_params(state["params"])  # a collective: every process
    if is_main:  # adapters (+ head) only: applied on top of model.init_from at load
      save_adapters(str(workdir / "adapters.safetensors"), host, run.trainable,
                    {"step": str(step), "peft.method": cfg.peft.method,
                     "model.init_from": cfg.model.init_from})
  if monitor.exhausted:
    raise monitor.error(monitor.last_step)
  if stopped_by is not None:
    if is_main:
      print(f"lmos train: stopped by {stopped_by} at step {step}; checkpoint saved in "
            f"{ckpt.step_dir(saved_step)}. Rerun the same command to resume.", flush=True)
    return last
  if t.sample_tokens > 0:
    host_params = distributed.host_params(state["params"])  # a collective: every process
  if is_main and t.sample_tokens > 0:
    text = sample_text(run, host_params, t.sample_prompt, t.sample_tokens, cfg.seed)
    print("--- sample ---\n" + text + "\n--------------", flush=True)
  return last


def _model_tcfg(run: Run):
  from flax import nnx
  model = nnx.eval_shape(lambda: nnx.merge(run.graphdef, run.abstract_state["params"]))
  return model.cfg


def _meta(cfg, step: int, tokens_seen: int, wall: float, skipped_steps: int = 0,
          data_state: dict | None = None) -> dict:
  import flax
  import lmos_jax
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
    last = train(fv.config, fv.workdir)
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
