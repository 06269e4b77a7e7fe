"""Experiment tracking next to metrics.jsonl/TensorBoard: Weights & Biases and profiler traces.

W&B runs on process 0 only and is optional (`tracking.wandb`); offline mode (WANDB_MODE=offline
or `tracking.wandb_mode=offline`) writes under WORKDIR/wandb for a later `wandb sync`. The run
id is kept in WORKDIR/wandb_run_id so a resumed run continues the same W&B run, and the
hyperparameters are sent once, at init. A `jax.profiler` trace covers the step range
[profile_start_step, profile_start_step + profile_steps) on every process (each host's trace
is its own), into WORKDIR/profile/process_N for TensorBoard's profile plugin or Perfetto.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from lmos_jax.config.loading import ConfigError

WANDB_MODES = ("online", "offline", "disabled")


class TrackingError(ConfigError):
  """A tracking setting is wrong; the message names the field and the fix."""


def check_tracking(tcfg: Any) -> None:
  """Validates the `tracking` block before anything compiles."""
  if tcfg.wandb_mode and tcfg.wandb_mode not in WANDB_MODES:
    raise TrackingError(f"config 'tracking.wandb_mode'={tcfg.wandb_mode!r}: expected one of "
                        f"{', '.join(WANDB_MODES)} or empty (WANDB_MODE, else online)")
  if tcfg.profile_start_step >= 0 and tcfg.profile_steps <= 0:
    raise TrackingError(f"config 'tracking.profile_steps'={tcfg.profile_steps} must be "
                        "positive when tracking.profile_start_step >= 0")
  if tcfg.wandb:
    try:
      import wandb  # noqa: F401
    except ImportError:
      raise TrackingError("config 'tracking.wandb'=True needs the wandb package: "
                          "pip install 'lmos_jax[wandb]' (or set tracking.wandb=False)") from None


def profile_window(tcfg: Any) -> tuple[int, int] | None:
  """[first, end) of the traced steps, where step s is the update taking state s to s+1."""
  if tcfg.profile_start_step < 0:
    return None
  return tcfg.profile_start_step, tcfg.profile_start_step + tcfg.profile_steps


def flat_hparams(cfg: Any) -> dict[str, Any]:
  """{'model.d_model': 128, ...}: flat keys read well in W&B's run table."""
  out: dict[str, Any] = {}

  def walk(prefix: str, node: Any) -> None:
    if isinstance(node, dict):
      for k, v in node.items():
        walk(f"{prefix}{k}.", v)
    else:
      out[prefix.rstrip(".")] = node

  walk("", json.loads(cfg.to_json()))
  return out


class Tracker:
  """W&B logging (process 0) and the profiler window (every process) for one training run."""

  def __init__(self, cfg: Any, workdir: Path, process_index: int):
    """`cfg.tracking` is checked (`check_tracking`) when the run is set up."""
    self.tcfg = cfg.tracking
    self.workdir = Path(workdir)
    self.process_index = process_index
    self.window = profile_window(cfg.tracking)
    self.profile_dir = self.workdir / "profile" / f"process_{process_index}"
    self.tracing = False
    self.wandb_run = None
    if cfg.tracking.wandb and process_index == 0:
      self.wandb_run = self._init_wandb(cfg)

  def _init_wandb(self, cfg: Any):
    import wandb

    id_file = self.workdir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    t = self.tcfg
    mode = t.wandb_mode or os.environ.get("WANDB_MODE") or "online"
    tags = [s.strip() for s in t.wandb_tags.split(",") if s.strip()]
    # config= at init is the one time hyperparameters are sent; resume reuses the same run.
    return wandb.init(project=t.wandb_project, entity=t.wandb_entity or None,
                      name=t.wandb_name or self.workdir.name, id=run_id, resume="allow",
                      dir=str(self.workdir), mode=mode, tags=tags or None,
                      config=flat_hparams(cfg))

  def log(self, step: int, scalars: dict[str, float]) -> None:
    if self.wandb_run is not None:
      self.wandb_run.log({k: float(v) for k, v in scalars.items()}, step=int(step))

  def step_context(self, step: int, steps: int = 1):
    """Starts the trace at the call holding the window's first step (a call runs `steps`
    steps from `step`); annotates traced calls for the viewer."""
    if self.window is None:
      return contextlib.nullcontext()
    first, end = self.window
    if step <= first < step + steps and not self.tracing:
      import jax
      self.profile_dir.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.profile_dir))
      self.tracing = True
    if self.tracing:
      import jax
      return jax.profiler.StepTraceAnnotation("train", step_num=int(step))
    return contextlib.nullcontext()

  def after_step(self, step_done: int, state: Any) -> None:
    """Stops the trace once the window's last step has really finished on the device."""
    if self.tracing and step_done >= self.window[1]:
      self._stop(state)

  def _stop(self, state: Any = None) -> None:
    import jax
    if state is not None:
      jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.tracing = False

  def close(self, state: Any = None) -> None:
    if self.tracing:  # the run ended inside the window
      self._stop(state)
    if self.wandb_run is not None:
      self.wandb_run.finish()
      self.wandb_run = None
