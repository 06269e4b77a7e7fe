"""`lmos train`: the training loop around the pure step, with eval, logging and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmos_jax.config.loading import validate
from lmos_jax.data.build import build_data
from lmos_jax.models.factory import model_factory
from lmos_jax.models.gpt import count_params
from lmos_jax.parallel.sharding import batch_sharding, make_mesh
from lmos_jax.train.checkpoint import Checkpointer, abstract_like
from lmos_jax.train.losses import lm_loss
from lmos_jax.train.metrics import MetricWriter, device_peak_flops, flops_per_token
from lmos_jax.train.optim import make_optimizer, make_schedule
from lmos_jax.train.precision import resolve_policy
from lmos_jax.train.step import (StepConfig, jit_eval_step, jit_train_step, train_state_layout)


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


def loss_for_task(task: str):
  if task == "lm":
    return lm_loss
  raise ValueError(f"config 'task'={task!r}: expected lm")


def build_run(cfg, devices=None) -> Run:
  """Validates the config, builds data, mesh, model layout and step config (no compile)."""
  devices = jax.devices() if devices is None else devices
  validate(cfg, len(devices))
  data = build_data(cfg, jax.process_index(), jax.process_count())
  if cfg.model.vocab_size and data.tokenizer.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"the tokenizer has {data.tokenizer.vocab_size} ids but "
                     f"'model.vocab_size'={cfg.model.vocab_size}; raise it or set 0 (auto)")
  mesh = make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), devices)
  policy = resolve_policy(cfg.train.precision, devices[0].platform)
  make_model = model_factory(cfg.model, data.tokenizer.vocab_size)
  tx = make_optimizer(cfg.train)
  graphdef, init_fn, abstract, shardings = train_state_layout(make_model, tx, policy, mesh)
  step_cfg = StepConfig(graphdef=graphdef, tx=tx, loss_fn=loss_for_task(cfg.task),
                        policy=policy, microbatches=cfg.train.microbatches, l2=cfg.train.l2,
                        decay_embeddings=cfg.train.decay_embeddings,
                        decay_norms_and_biases=cfg.train.decay_norms_and_biases,
                        schedule=make_schedule(cfg.train))
  return Run(cfg, mesh, data, graphdef, init_fn, abstract, shardings, step_cfg,
             count_params(abstract["params"]))


def global_batch(run: Run, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles the global batch from this host's rows (works for one or many processes)."""
  out = {}
  for k, v in local.items():
    sh = batch_sharding(run.mesh, v.ndim)
    global_shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
    out[k] = jax.make_array_from_process_local_data(sh, v, global_shape)
  return out


def init_or_restore(run: Run, ckpt: Checkpointer) -> tuple[dict, dict]:
  """Latest checkpoint in the workdir if any (checked against this config), else fresh init."""
  step = ckpt.latest_step()
  if step is None:
    with jax.set_mesh(run.mesh):
      state = jax.jit(run.init_fn, out_shardings=run.shardings)(jax.random.PRNGKey(run.cfg.seed))
    return state, {}
  meta = ckpt.restore_meta(step)
  saved_model = json.loads(meta.get("config", "{}")).get("model")
  if saved_model is not None and saved_model != json.loads(run.cfg.to_json())["model"]:
    raise ValueError(f"{ckpt.directory} holds a checkpoint (step {step}) of a different "
                     "model config; use a fresh --workdir or the original model settings")
  state, meta = ckpt.restore(step, abstract_like(run.abstract_state, run.shardings))
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
  info = {"kind": type(tok).__name__}
  if hasattr(tok, "chars"):
    info["chars"] = tok.chars
  (workdir / "tokenizer.json").write_text(json.dumps(info))


def train(cfg, workdir: str | Path) -> dict[str, Any]:
  """Runs (or resumes) training to cfg.train.steps; returns the last logged metrics."""
  from tqdm import tqdm

  workdir = Path(workdir)
  run = build_run(cfg)
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  t = cfg.train
  ckpt = Checkpointer(workdir, keep=t.keep_checkpoints)
  state, meta = init_or_restore(run, ckpt)
  start = int(jax.device_get(state["step"]))
  save_side_files(run, workdir)
  writer = MetricWriter(workdir, enabled=is_main)
  ndims = {k: v.ndim for k, v in run.data.train_batch(0).items()}
  train_fn = jit_train_step(run.step_cfg, run.shardings, run.mesh, ndims)
  eval_fn = jit_eval_step(run.step_cfg, run.shardings["params"], run.mesh, ndims)
  tcfg = _model_tcfg(run)
  tokens_per_step = t.batch_size * cfg.data.seq_len
  flops_step = flops_per_token(tcfg, cfg.data.seq_len) * tokens_per_step
  peak, peak_src = device_peak_flops()
  if is_main:
    print(f"lmos train: {run.num_params:,} params, mesh {dict(run.mesh.shape)}, "
          f"precision {run.step_cfg.policy.name}, peak {peak:.3g} FLOP/s ({peak_src}); "
          f"{'resuming at step ' + str(start) if start else 'fresh start'}", flush=True)
  last: dict[str, Any] = {}
  tokens_seen = int(meta.get("tokens_seen", start * tokens_per_step))
  wall0 = time.time() - float(meta.get("wall_time", 0.0))
  pbar = tqdm(total=t.steps, initial=start, disable=not (t.progress and is_main),
              dynamic_ncols=True, file=sys.stderr)
  pending = None
  mark_time, mark_step = None, start

  def flush(pending) -> None:
    nonlocal last, mark_time, mark_step
    step, metrics = pending
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    if mark_time is None:  # first step includes compilation: start the clock after it
      mark_time, mark_step = now, step
      rate = float("nan")
    else:
      rate = (step - mark_step) * tokens_per_step / max(now - mark_time, 1e-9)
    m["tokens_per_sec"] = rate
    m["mfu"] = rate / tokens_per_step * flops_step / peak if rate == rate else float("nan")
    last = m
    pbar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{rate:,.0f}")
    if step % t.log_every == 0 or step == t.steps:
      row = dict(m)
      if step % t.eval_every == 0 or step == t.steps:
        row.update(evaluate(run, eval_fn, state["params"]))
        last.update(row)
      writer.write(step, row)
      mark_time, mark_step = time.perf_counter(), step

  with jax.set_mesh(run.mesh):
    step = start
    while step < t.steps:
      batch = global_batch(run, run.data.train_batch(step))
      state, metrics = train_fn(state, batch)
      step += 1
      tokens_seen += tokens_per_step
      pbar.update(1)
      if pending is not None:  # the previous step's metrics: no host sync on this one
        flush(pending)
        pending = None
      if step % t.log_every == 0 or step % t.ckpt_every == 0 or step == t.steps:
        flush((step, metrics))  # log points sync, so the interval timing is exact
      else:
        pending = (step, metrics)
      if step % t.ckpt_every == 0 or step == t.steps:
        ckpt.save(step, state, _meta(cfg, step, tokens_seen, time.time() - wall0))
  pbar.close()
  ckpt.close()
  writer.close()
  if is_main and t.sample_tokens > 0:
    text = sample_text(run, state["params"], t.sample_prompt, t.sample_tokens, cfg.seed)
    print("--- sample ---\n" + text + "\n--------------", flush=True)
  return last


def _model_tcfg(run: Run):
  from flax import nnx
  model = nnx.eval_shape(lambda: nnx.merge(run.graphdef, run.abstract_state["params"]))
  return model.cfg


def _meta(cfg, step: int, tokens_seen: int, wall: float) -> dict:
  import flax
  import lmos_jax
  return {"step": int(step), "tokens_seen": int(tokens_seen), "wall_time": float(wall),
          "config": cfg.to_json(), "versions": {"jax": jax.__version__, "flax": flax.__version__,
                                                "lmos_jax": lmos_jax.__version__}}


def sample_text(run: Run, params, prompt: str, num_tokens: int, seed: int) -> str:
  from lmos_jax.inference.sample import sample_tokens
  tok = run.data.tokenizer
  ids = tok.encode(prompt) if prompt else np.asarray([], np.int32)
  params = jax.device_get(params)
  out = sample_tokens(run.graphdef, params, ids, num_tokens, run.cfg.data.seq_len,
                      temperature=0.8, seed=seed)
  return prompt + tok.decode(out)


def main(argv: list[str]) -> int:
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", "configs/default.py", "config file[:arg]",
                                  flag_values=fv, lock_config=True)
  flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, logs)",
                      flag_values=fv)
  fv(argv)
  if not fv.workdir:
    print("lmos train: --workdir is required", file=sys.stderr)
    return 2
  from lmos_jax.config.loading import ConfigError
  try:
    last = train(fv.config, fv.workdir)
  except ConfigError as e:
    print(f"lmos train: config error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({k: round(v, 5) for k, v in last.items()}), flush=True)
  return 0
