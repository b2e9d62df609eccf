"""Orbax checkpoints of the train state plus the data position (JSON).

Layout: MODEL_DIR/checkpoints/<step>/{state,data}. Saves are asynchronous and atomic
(orbax writes to a temporary directory and renames it when every host has finished),
so a run killed mid-save leaves the previous checkpoint as the latest one. Restoring
takes abstract arrays carrying target shardings, so a checkpoint written on one mesh
loads onto any other.
"""
import logging
import os
from typing import Any, Optional

import gin
import orbax.checkpoint as ocp


@gin.configurable
class Checkpointer:
  """Periodic, keep-N, asynchronous checkpointing of {state, data}.

  Args:
    directory: where the step directories go.
    save_every: steps between periodic saves (final and pre-emption saves are forced).
    keep: number of most recent checkpoints kept (None keeps all).
    async_save: write in a background thread while training continues.
  """

  def __init__(self, directory: str, save_every: int = 1000, keep: Optional[int] = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(save_every), 1), max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data: dict, force: bool = False) -> bool:
    """Starts a save if `step` is due (or `force`); returns whether one started."""
    saved = self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data)), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restores (state, data) at `step` (default latest) into `abstract_state`'s shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return restored.state, dict(restored.data or {})

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
