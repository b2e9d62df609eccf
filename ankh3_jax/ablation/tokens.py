"""Measures the tokens a training run consumes: a data source wrapper for gin.

`TokenCountingSource` passes every call through to the wrapped source (a `SeqioSource`)
and counts, over the train batches it hands out, the non-padding encoder input tokens,
the scored target tokens and the packed sequences. Counts cover every batch consumed
from step 0: a resumed run re-reads the batches before its start (instead of skipping
them inside tf.data), so the stream, and the count, equal an uninterrupted run's. They
are written atomically to MODEL_DIR/tokens_seen.json when the stream is closed (the
trainer closes it at the end of training or on pre-emption). With several processes
each counts its own rows and only process 0 writes.
"""
import os
from typing import Any, Iterator

import gin
import numpy as np

from ankh3_jax.ablation import files

TOKENS_FILE = "tokens_seen.json"


def count_batch(batch: dict) -> dict:
  """Non-padding input tokens, scored target tokens and sequences of one packed batch."""
  inputs = batch["encoder_input_tokens"]
  if "decoder_loss_weights" in batch:
    targets = float(np.sum(batch["decoder_loss_weights"]))
  else:
    targets = float(np.sum(batch["decoder_target_tokens"] > 0))
  if "encoder_segment_ids" in batch:
    segments = batch["encoder_segment_ids"]
    sequences = sum(len(np.unique(row[row > 0])) for row in segments)
  else:
    sequences = int(np.sum(np.any(inputs > 0, axis=1)))
  return {"input_tokens": int(np.sum(inputs > 0)), "target_tokens": int(targets),
          "sequences": int(sequences), "rows": int(inputs.shape[0]),
          "padded_positions": int(inputs.size + batch["decoder_target_tokens"].size)}


def read_counts(model_dir: str):
  """The counts written by a run in `model_dir`, or None."""
  return files.read_json(os.path.join(model_dir, TOKENS_FILE))


@gin.configurable
class TokenCountingSource:
  """Counts the train tokens of `source`; everything else is delegated to it."""

  def __init__(self, source: Any = gin.REQUIRED, model_dir: str = gin.REQUIRED):
    self.source = source
    self.model_dir = model_dir

  def __getattr__(self, name: str):
    if name == "source":  # not set yet (e.g. while unpickling)
      raise AttributeError(name)
    return getattr(self.source, name)

  def _write(self, counts: dict) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_index() != 0:
      return
    files.write_json(os.path.join(self.model_dir, TOKENS_FILE), counts)

  def train_batches(self, layout, start_batch: int = 0) -> Iterator[dict]:
    counts = {"batches": 0}
    stream = self.source.train_batches(layout, start_batch=0)
    try:
      for batch in stream:
        for key, value in count_batch(batch).items():
          counts[key] = counts.get(key, 0) + value
        counts["batches"] += 1
        if counts["batches"] > start_batch:
          yield batch
    finally:
      stream.close()
      self._write(counts)
