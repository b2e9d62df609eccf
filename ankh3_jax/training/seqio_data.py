"""Feeds seqio tasks/mixtures to the trainer: train stream and per-task eval sets.

Data position on resume: the train stream is a deterministic function of (mixture,
feature lengths, seed, batch layout); a resumed run rebuilds it and skips the batches
already consumed (`tf.data` skip: the skipped examples are still read and
preprocessed, in C++, but never leave TensorFlow). This keeps checkpoints small and
independent of tf.data internals, at the cost of a replay on resume.

Host modes: 'shard' (default for pods) gives each data shard its own seqio `ShardInfo`
slice of the source and a per-shard batch; 'slice' builds the global batch on every
host and keeps this host's rows (the stream is then independent of the process count:
used by tests and small runs).
"""
import contextlib
import logging
import re
from typing import Iterator, Mapping, Optional, Sequence

import gin
import numpy as np

from ankh3_jax import vocab as vocab_lib
from ankh3_jax.partitioning import DataLayout
from ankh3_jax.training import residue_eval

HOST_MODES = ("shard", "slice")


class DataInputError(ValueError):
  """An input file of the data source is missing; the message names it and its task."""


def _import_seqio():
  """Imports TensorFlow/seqio lazily and keeps TensorFlow off any accelerator."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # already initialised
    pass
  return seqio, tf


@contextlib.contextmanager
def _naming_task(name: str):
  """Re-raises a preprocessor's MaskingCapError with the task's name in front."""
  from ankh3_jax.data.preprocessors import MaskingCapError  # pylint: disable=g-import-not-at-top
  try:
    yield
  except MaskingCapError as e:
    text = "\n".join(line for line in str(e).splitlines()
                     if not line.strip().startswith("In call to configurable"))
    raise MaskingCapError(f"{name}: {text}") from e


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> dict:
  """Pads the rows of a short final batch with zeros (zero loss weight)."""
  out = {}
  for key, value in batch.items():
    missing = batch_size - value.shape[0]
    out[key] = np.pad(value, [(0, missing)] + [(0, 0)] * (value.ndim - 1)) if missing else value
  return out


@gin.configurable
class SeqioSource:
  """A seqio mixture (or task) for training and its tasks for evaluation.

  Args:
    mixture_or_task_name: registered seqio name (tasks are registered by importing
      `ankh3_jax.tasks`, which the objective gin files do).
    task_feature_lengths: e.g. {'inputs': 512, 'targets': 512}.
    eval_task_names: tasks evaluated separately; default: the mixture's tasks.
    seed: seed of the train stream (shuffle, mixing and preprocessing randomness).
    eval_seed: seed of the eval sets' preprocessing (masks), fixed across evaluations.
    pack: pack examples (EncDecFeatureConverter(pack=True)).
    max_eval_batches: cap on eval batches per task (None: the whole split).
    host_mode: 'shard' or 'slice' (see module docstring).
    feature_converter_cls: seqio feature converter class (default EncDecFeatureConverter).
  """

  def __init__(self, mixture_or_task_name: str = gin.REQUIRED,
               task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
               eval_task_names: Optional[Sequence[str]] = None,
               train_split: str = "train", eval_split: str = "validation",
               seed: int = 0, eval_seed: int = 0, pack: bool = True,
               max_eval_batches: Optional[int] = None, host_mode: str = "shard",
               use_cached: bool = False, feature_converter_cls=None):
    if host_mode not in HOST_MODES:
      raise ValueError(f"host_mode must be one of {HOST_MODES}, got {host_mode!r}")
    self.name = mixture_or_task_name
    self.feature_lengths = dict(task_feature_lengths)
    self._eval_task_names = list(eval_task_names) if eval_task_names else None
    self.train_split, self.eval_split = train_split, eval_split
    self.seed, self.eval_seed = seed, eval_seed
    self.pack = pack
    self.max_eval_batches = max_eval_batches
    self.host_mode = host_mode
    self.use_cached = use_cached
    self.feature_converter_cls = feature_converter_cls

  def describe(self) -> dict:
    return {"source": "seqio", "name": self.name, "seed": self.seed,
            "feature_lengths": self.feature_lengths, "pack": self.pack,
            "host_mode": self.host_mode}

  def _provider(self, name: str):
    seqio, _ = _import_seqio()
    try:
      return seqio.get_mixture_or_task(name)
    except ValueError as e:
      raise ValueError(f"{e}. Is the gin file that imports the task registry "
                       "(e.g. objectives/ankh3.gin, `import ankh3_jax.tasks`) included?"
                       ) from e

  def eval_task_names(self) -> list:
    if self._eval_task_names:
      return list(self._eval_task_names)
    provider = self._provider(self.name)
    return [t.name for t in getattr(provider, "tasks", [provider])]

  def residue_stats(self, task: str, cache_path: Optional[str] = None,
                    max_sequences: int = residue_eval.DEFAULT_MAX_SEQUENCES):
    """Training-split residue statistics of `task`'s source (see residue_eval), read
    from `cache_path` when stored there, else counted over at most `max_sequences`
    training sequences (in file order) and stored; None for a task whose source has no
    protein `sequence` feature."""
    task_obj = self._provider(task)
    source = getattr(task_obj, "source", None)
    if source is None:
      return None
    vocabulary = task_obj.output_features["targets"].vocabulary
    residue_ids = [vocabulary.tokenizer.piece_to_id(c) for c in vocab_lib.RESIDUES]
    first_sentinel = vocabulary.vocab_size - vocabulary.extra_ids
    key = re.sub(r" at 0x[0-9a-f]+", "", f"{source!r} split={self.train_split}")

    def estimate():
      ds = source.get_dataset(split=self.train_split, shuffle=False).take(max_sequences)
      sequences = (ex["sequence"].decode("ascii", "replace")
                   for ex in ds.as_numpy_iterator())
      return residue_eval.estimate_stats(sequences, residue_ids, vocabulary.eos_id,
                                         first_sentinel, key)

    try:
      return residue_eval.load_or_estimate(cache_path, key, estimate)
    except KeyError:  # a text-to-text task without a "sequence" feature
      logging.info("task %s: no protein sequences, no residue metrics", task)
      return None

  def check_inputs(self, evaluate: bool = True) -> None:
    """Raises DataInputError if a FASTA file of the train (and eval) split is missing,
    and the preprocessors' own errors for these feature lengths (e.g. MaskingCapError).

    Cheap (no data is read): lets the trainer fail before it writes anything.
    """
    _, tf = _import_seqio()
    wanted = [(self.name, self.train_split)]
    if evaluate:
      wanted += [(task, self.eval_split) for task in self.eval_task_names()]
    for name, split in wanted:
      provider = self._provider(name)
      for task in getattr(provider, "tasks", [provider]):
        paths = getattr(task.source, "split_paths", None)
        if paths is None:  # not file-based (e.g. TFDS): checked when read
          continue
        if split not in paths:
          raise DataInputError(f"task {task.name}: its source has no {split!r} split "
                               f"(it has {sorted(paths)})")
        for path in paths[split]:
          if not tf.io.gfile.exists(path):
            raise DataInputError(f"{path}: no such file (split {split!r} of task "
                                 f"{task.name})")
      for task in getattr(provider, "tasks", [provider]):  # builds, reads nothing
        with _naming_task(task.name):
          task.get_dataset(self.feature_lengths, split=split, shuffle=False, num_epochs=1)

  def _dataset(self, name: str, split: str, shuffle: bool, seed: int, num_epochs,
               layout: DataLayout, batch_size: int, drop_remainder: bool):
    seqio, tf = _import_seqio()
    shard_info = None
    if self.host_mode == "shard" and layout.num_shards > 1:
      shard_info = seqio.ShardInfo(index=layout.shard_id, num_shards=layout.num_shards)
    with _naming_task(name):
      ds = self._provider(name).get_dataset(
          sequence_length=self.feature_lengths, split=split, use_cached=self.use_cached,
          shuffle=shuffle, seed=seed, shard_info=shard_info, num_epochs=num_epochs)
    converter_cls = self.feature_converter_cls or seqio.EncDecFeatureConverter
    ds = converter_cls(pack=self.pack)(ds, self.feature_lengths)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).batch(batch_size, drop_remainder=drop_remainder)

  def _batch_size(self, layout: DataLayout) -> int:
    return layout.shard_batch_size if self.host_mode == "shard" else layout.global_batch_size

  def _rows(self, batch: dict, layout: DataLayout) -> dict:
    if self.host_mode == "slice":
      return {k: v[layout.rows] for k, v in batch.items()}
    return batch

  def train_batches(self, layout: DataLayout, start_batch: int = 0) -> Iterator[dict]:
    _, tf = _import_seqio()
    ds = self._dataset(self.name, self.train_split, True, self.seed, None, layout,
                       self._batch_size(layout), drop_remainder=True)
    if start_batch:
      logging.info("data: skipping %d consumed batches of %s", start_batch, self.name)
      ds = ds.skip(start_batch)
    for batch in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
      yield self._rows(batch, layout)

  def eval_batches(self, task: str, layout: DataLayout) -> list:
    size = self._batch_size(layout)
    ds = self._dataset(task, self.eval_split, False, self.eval_seed, 1, layout, size,
                       drop_remainder=False)
    if self.max_eval_batches:
      ds = ds.take(self.max_eval_batches)
    return [self._rows(pad_batch(b, size), layout) for b in ds.as_numpy_iterator()]
