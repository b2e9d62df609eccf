"""What the trainer reads its data from: the `DataSource` protocol.

`seqio_data.SeqioSource` (seqio tasks and mixtures) and `synthetic_data.SyntheticSource`
(smoke tests) provide it; any object with these members can be passed as
`train(data_source=...)`. Batches are dicts of numpy arrays in the encoder-decoder
feature converter's layout (`encoder_input_tokens`, `decoder_target_tokens`, ... with
segment ids and positions when packed), `layout.shard_batch_size` rows each: this
process's share of the global batch.
"""
from typing import Iterator, Mapping, Optional, Protocol

from ankh3_jax.partitioning import DataLayout


class DataSource(Protocol):
  """The data of one training run (required members)."""

  feature_lengths: Mapping[str, int]  # {'inputs': ..., 'targets': ...}

  def describe(self) -> dict:
    """JSON-ready identity of the stream (saved with checkpoints, compared on resume)."""

  def eval_task_names(self) -> list:
    """Names of the tasks validated separately (may be empty)."""

  def train_batches(self, layout: DataLayout, start_batch: int = 0) -> Iterator[dict]:
    """This process's rows of global batches `start_batch`, `start_batch + 1`, ...: the
    same rows for the same batch number, so a resumed run continues the stream."""

  def eval_batches(self, task: str, layout: DataLayout) -> list:
    """This process's rows of every validation batch of `task`."""


class CheckedInputs(Protocol):
  """Optional: files checked before the run writes anything."""

  def check_inputs(self, evaluate: bool = True) -> None:
    """Raises (e.g. seqio_data.DataInputError) naming a missing or unreadable input."""


class ResidueStats(Protocol):
  """Optional: the residue baselines of a task's validation (see residue_eval)."""

  def residue_stats(self, task: str, cache_path: Optional[str] = None):
    """Baseline statistics of `task` (read from / stored in `cache_path`), or None."""


def missing_members(source) -> list:
  """The `DataSource` members `source` lacks (looked up as `getattr` does, so a wrapper
  that delegates with `__getattr__` provides its inner source's)."""
  names = ("feature_lengths", "describe", "eval_task_names", "train_batches",
           "eval_batches")
  return [name for name in names if not hasattr(source, name)]
