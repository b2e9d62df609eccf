"""Orbax checkpoints of the train state plus the data position (JSON), verified on restore.

Layout: MODEL_DIR/checkpoints/<step>/{state,data}. Saves are asynchronous and atomic
(orbax writes to a temporary directory and renames it when every host has finished),
so a run killed mid-save leaves the previous checkpoint as the latest one. Each save
also records a checksum of every state leaf in the data item; a restore recomputes
them, so a truncated or corrupted checkpoint is detected even where the file format
would read it back silently. `restore_latest_good` falls back to older checkpoints and
moves the bad ones aside (never deletes them). Restoring takes abstract arrays carrying
target shardings, so a checkpoint written on one mesh loads onto any other.
"""
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

CHECKSUMS = "state_checksums"
QUARANTINE = "corrupt_checkpoints"


class CheckpointError(RuntimeError):
  """A checkpoint could not be read back intact; names the directory and reason."""


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """Position-weighted sum (mod 2**32) of the leaf's bit patterns.

  Integer sums are exact in any reduction order, so the value does not depend on the
  mesh; the odd weights make every single-element change (and swaps) visible.
  """
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  x = x.reshape(-1)
  unsigned = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
  bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  weights = jnp.arange(x.size, dtype=jnp.uint32) * 2 + 1
  return jnp.sum(bits * weights, dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def state_checksums(state: Any) -> dict:
  """{leaf path: checksum} of a (possibly sharded, multi-process) pytree of arrays."""
  values = jax.device_get(_checksums(state))
  flat = jax.tree_util.tree_flatten_with_path(values)[0]
  return {jax.tree_util.keystr(path): int(v) for path, v in flat}


def _verify(state: Any, saved: Optional[dict], where: str) -> None:
  if saved is None:
    logging.warning("checkpoint %s has no checksums (older format): not verified", where)
    return
  current = state_checksums(state)
  if set(current) != set(saved):
    raise CheckpointError(f"{where}: the state's leaves differ from the saved checksums' "
                          f"({len(current)} vs {len(saved)} leaves)")
  bad = [k for k in current if current[k] != saved[k]]
  if bad:
    raise CheckpointError(f"{where}: corrupt: checksum mismatch in {len(bad)} leaf/leaves, "
                          f"first {bad[0]}")


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
    # Directories are made before save() returns (behind a barrier across hosts), not
    # in the background: with background creation, orbax 0.12's array-metadata writer
    # on the primary host can make `state.orbax-checkpoint-tmp` (as a parent) while
    # the directory creator is about to, which fails the save with FileExistsError and
    # leaves the other hosts waiting. The arrays are still written in the background.
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(save_every), 1), max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list:
    return sorted(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, data: dict, force: bool = False) -> bool:
    """Starts a save if `step` is due (or `force`); returns whether one started."""
    if not (force or self._manager.should_save(step)):
      return False
    data = {**data, CHECKSUMS: state_checksums(state)}
    saved = self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data)), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restores and verifies (state, data) at `step` (default latest) into
    `abstract_state`'s shardings; raises CheckpointError if it is not intact."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    where = self.step_dir(step)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files
      first_line = (str(e).strip().splitlines() or [""])[0][:300]
      raise CheckpointError(f"{where}: cannot be read ({type(e).__name__}: "
                            f"{first_line})") from e
    data = dict(restored.data or {})
    _verify(restored.state, data.pop(CHECKSUMS, None), where)
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return restored.state, data

  def restore_latest_good(self, abstract_state: Any) -> Optional[tuple[Any, dict]]:
    """(state, data) of the newest intact checkpoint, or None when there is none.

    Newer checkpoints that fail are moved to MODEL_DIR/corrupt_checkpoints/ once an
    older one has restored (proving the failures are not a model/config mismatch), so
    that training continues from the good one. If every checkpoint fails, nothing is
    moved and a CheckpointError lists each one's reason.
    """
    failures = []
    for step in reversed(self.all_steps()):
      try:
        restored = self.restore(abstract_state, step)
      except CheckpointError as e:
        logging.error("checkpoint: %s; trying an older one", e)
        failures.append((step, str(e)))
        continue
      if failures:
        self._quarantine([s for s, _ in failures])
        logging.error("checkpoint: fell back to step %d; corrupt checkpoints moved to %s",
                      step, self.quarantine_dir)
      return restored
    if failures:
      reasons = "\n  ".join(reason for _, reason in failures)
      raise CheckpointError(f"no intact checkpoint in {self.directory} (nothing was moved "
                            f"or deleted; if the model config changed, use a new "
                            f"MODEL_DIR):\n  {reasons}")
    return None

  @property
  def quarantine_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory), QUARANTINE)

  def _quarantine(self, steps: list) -> None:
    if jax.process_index() == 0:
      os.makedirs(self.quarantine_dir, exist_ok=True)
      for step in steps:
        target = os.path.join(self.quarantine_dir, str(step))
        suffix = 1
        while os.path.exists(target):
          target = os.path.join(self.quarantine_dir, f"{step}.{suffix}")
          suffix += 1
        os.rename(self.step_dir(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("ankh3_quarantine_checkpoints")
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
