"""Pre-emption (SIGTERM) detection that all processes agree on.

Single process: a SIGTERM handler sets a flag, checked after each step. Multi-process:
JAX's distributed runtime already listens for SIGTERM and runs a sync protocol;
`reached_preemption_sync_point(step)` turns True on every process at the same step,
so all of them save the same checkpoint.
"""
import logging
import signal

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """Use as a context manager around the train loop; ask `should_stop(step)` each step."""

  def __init__(self):
    self._flag = False
    self._previous = None

  def _handler(self, signum, frame):
    del frame
    logging.warning("received signal %d: will checkpoint and exit after this step", signum)
    self._flag = True

  def __enter__(self):
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handler)
      except ValueError:  # not the main thread: leave SIGTERM alone
        logging.warning("not in the main thread: SIGTERM will not save a checkpoint")
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
    return False

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._flag
    return multihost_utils.reached_preemption_sync_point(step)
