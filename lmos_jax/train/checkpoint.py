"""Orbax checkpoints: train state (sharded arrays) + JSON metadata (config, step, data state).

Saves are asynchronous; orbax writes to a temporary directory and renames it on success, so
a half-written step is never listed. Restore takes abstract arrays carrying the *current*
shardings, so a checkpoint saved on one mesh restores onto any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def abstract_like(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with target shardings: what restore should produce."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the run's layout under WORKDIR/checkpoints."""

  def __init__(self, workdir: Path, keep: int, async_save: bool = True):
    self.directory = Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    return self.manager.save(int(step), args=args, force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              meta=ocp.args.JsonRestore())
    out = self.manager.restore(int(step), args=args)
    return out.state, out.meta

  def restore_meta(self, step: int) -> dict:
    out = self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return out.meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
