"""seqio Tasks for downstream fine-tuning (installed as `ankh3_jax.tasks.downstream`).

Text-to-text tasks on the shipped structure-derived set (splits train / validation / test
of `ankh3_jax/assets/downstream/structures.npz`), one `ankh3_<name>` per record of the
downstream task table (`ankh3_jax.downstream.tasks`) whose labels are letters:
  ankh3_ss3  inputs "[NLU]" + residues, targets one H/E/C letter per residue
  ankh3_ss8  inputs "[NLU]" + residues, targets one DSSP-8 letter per residue (coil 'C')
The state letters are single pieces of the protein vocabulary, so no new tokens are needed.
Metric: per-residue accuracy (Q3 / Q8) of the decoded target string. Contacts and the
ConvBERT heads are trained by `ankh3-finetune` instead.
Registered once on import; the structure file is read only when a dataset (or a split's
example count) is requested.
"""
import functools

import numpy as np
import seqio
import tensorflow as tf

from ankh3_jax import vocab as vocab_lib
from ankh3_jax.downstream import data
from ankh3_jax.downstream import metrics
from ankh3_jax.downstream import tasks as task_table

SS3_TASK = "ankh3_ss3"
SS8_TASK = "ankh3_ss8"


_MISSING_TARGET, _MISSING_PREDICTION = -2, -3  # scored, and never equal


def _letter_codes(text: str, length: int, missing: int) -> np.ndarray:
  return np.array([ord(c) for c in text] + [missing] * (length - len(text)), np.int64)


def residue_accuracy(targets, predictions) -> dict:
  """seqio metric: `metrics.residue_accuracy` (%) of decoded state strings; a missing or
  extra letter is wrong."""
  labels, outputs = [], []
  for target, prediction in zip(targets, predictions):
    length = max(len(target), len(prediction))
    labels.append(_letter_codes(target, length, _MISSING_TARGET))
    outputs.append(_letter_codes(prediction, length, _MISSING_PREDICTION))
  if not sum(len(l) for l in labels):
    return {"residue_accuracy": 0.0}
  return {"residue_accuracy": 100.0 * metrics.residue_accuracy(outputs, labels)}


def _chains_dataset(split: str, shuffle_files: bool = False, seed=None, *, task: str):
  del shuffle_files, seed  # one small in-memory split
  chains = data.load_chains(split)
  labels = [task_table.get(task).chain_states(c) for c in chains]
  return tf.data.Dataset.from_tensor_slices({
      "id": [c.id for c in chains],
      "inputs": [vocab_lib.NLU_TOKEN + c.sequence for c in chains],
      "targets": labels})


class _ChainsSource(seqio.FunctionDataSource):
  """A split's chains; its size is read from the structure file only when asked."""

  def num_input_examples(self, split: str) -> int:
    return len(data.load_chains(split))


def register_downstream_tasks(vocabulary_path: str = vocab_lib.VOCAB_PATH) -> tuple:
  """Registers `ankh3_<name>` for each task with letter labels (skipped if already
  registered); returns their names."""
  features = vocab_lib.output_features(vocab_lib.get_vocabulary(vocabulary_path))
  names = []
  for record in task_table.TABLE.values():
    if record.chain_states is None:
      continue
    name = f"ankh3_{record.name}"
    names.append(name)
    if name in seqio.TaskRegistry.names():
      continue
    seqio.TaskRegistry.add(
        name,
        source=_ChainsSource(functools.partial(_chains_dataset, task=record.name),
                             splits=data.SPLITS),
        preprocessors=[seqio.preprocessors.tokenize,
                       seqio.preprocessors.append_eos_after_trim],
        output_features=features,
        metric_fns=[residue_accuracy])
  return tuple(names)


register_downstream_tasks()
