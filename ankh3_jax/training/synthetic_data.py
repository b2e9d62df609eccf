"""A deterministic synthetic encoder-decoder source (numpy only, no TensorFlow).

For tests and smoke runs: two learnable tasks, `synthetic_copy` (targets = inputs) and
`synthetic_reverse` (targets = inputs reversed). Row r of global batch b is drawn from
a generator seeded with (seed, b, r), so any process can make exactly its own rows and
resuming at batch b needs no replay.
"""
from typing import Iterator, Mapping, Sequence

import gin
import numpy as np

from ankh3_jax.partitioning import DataLayout

TASKS = ("synthetic_copy", "synthetic_reverse")
_FIRST_TOKEN, _LAST_TOKEN = 3, 28  # residue-like ids, clear of pad/eos/unk and sentinels
_EVAL_OFFSET = 1 << 20  # eval batches use batch indices no training run reaches


def _row(seed: int, batch: int, row: int, task: int, lengths: Mapping[str, int]) -> dict:
  rng = np.random.default_rng((seed, batch, row))
  n = int(rng.integers(4, min(lengths["inputs"], lengths["targets"])))
  tokens = rng.integers(_FIRST_TOKEN, _LAST_TOKEN + 1, n)
  targets = tokens if TASKS[task] == "synthetic_copy" else tokens[::-1]
  enc = np.zeros(lengths["inputs"], np.int32)
  dec = np.zeros(lengths["targets"], np.int32)
  enc[:n], dec[:n] = tokens, targets
  enc[n], dec[n] = 1, 1  # eos
  return {"encoder_input_tokens": enc, "decoder_target_tokens": dec}


def _batch(rows: list) -> dict:
  out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  targets = out["decoder_target_tokens"]
  out["decoder_input_tokens"] = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
  out["decoder_loss_weights"] = (targets > 0).astype(np.float32)
  return out


@gin.configurable
class SyntheticSource:
  """Synthetic copy/reverse data with the EncDecFeatureConverter's (unpacked) keys."""

  def __init__(self, task_feature_lengths: Mapping[str, int] = None, seed: int = 0,
               num_eval_batches: int = 2, poison_batches: Sequence[int] = ()):
    """`poison_batches`: train batch indices whose loss weights are NaN (the loss of the
    step consuming them is NaN: exercises the NaN guard)."""
    self.feature_lengths = dict(task_feature_lengths or {"inputs": 32, "targets": 32})
    self.seed = seed
    self.num_eval_batches = num_eval_batches
    self.poison_batches = frozenset(int(b) for b in poison_batches)

  def describe(self) -> dict:
    return {"source": "synthetic", "seed": self.seed, "feature_lengths": self.feature_lengths}

  def eval_task_names(self) -> list:
    return list(TASKS)

  def _rows(self, batch: int, layout: DataLayout, task=None) -> dict:
    rows = range(layout.rows.start, layout.rows.stop)
    pick = lambda r: task if task is not None else (batch + r) % len(TASKS)
    return _batch([_row(self.seed, batch, r, pick(r), self.feature_lengths) for r in rows])

  def train_batches(self, layout: DataLayout, start_batch: int = 0) -> Iterator[dict]:
    batch = start_batch
    while True:
      rows = self._rows(batch, layout)
      if batch in self.poison_batches:
        rows["decoder_loss_weights"] = np.full_like(rows["decoder_loss_weights"], np.nan)
      yield rows
      batch += 1

  def eval_batches(self, task: str, layout: DataLayout) -> list:
    index = TASKS.index(task)
    return [self._rows(_EVAL_OFFSET + i, layout, index) for i in range(self.num_eval_batches)]
