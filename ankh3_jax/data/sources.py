"""seqio data sources yielding {"id": tf.string, "sequence": tf.string}.

`FastaDataSource` streams FASTA files (default: the shipped corpus; local or `gs://`
paths and globs, read through `tf.io.gfile`) through `tf.data.Dataset.from_generator`;
`uniref50_tfds_source` reads the prepared TFDS `ankh3_uniref50` data set. Pre-training
on them: `ankh3_jax.tasks.pretrain.register_fasta_pretraining` / `training_data`.
"""
import glob
import io
import os
import random
from typing import Mapping, Optional, Sequence, Union

import gin
import seqio
import tensorflow as tf

from ankh3_jax.data import corpus
from ankh3_jax.data import fasta

OUTPUT_SIGNATURE = {"id": tf.TensorSpec([], tf.string),
                    "sequence": tf.TensorSpec([], tf.string)}
_BLOCK_SIGNATURE = {k: tf.TensorSpec([None], tf.string) for k in OUTPUT_SIGNATURE}
_BLOCK = 256
DEFAULT_SHUFFLE_BUFFER = 10_000

Paths = Union[str, Sequence[str]]


def _expand(split: str, paths: Paths) -> tuple:
  """Expands a path, a glob or a list of them into a sorted, non-empty tuple."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  files = []
  for path in paths:
    path = os.fspath(path)
    matches = sorted(tf.io.gfile.glob(path)) if glob.has_magic(path) else [path]
    if not matches:
      raise FileNotFoundError(f"split {split!r}: no file matches {path!r}")
    files.extend(matches)
  if not files:
    raise ValueError(f"split {split!r}: no FASTA files given")
  return tuple(files)


class _GFileRaw(io.RawIOBase):
  """A `tf.io.gfile.GFile` as a raw binary stream (GFile's readline takes no size)."""

  def __init__(self, path: str):
    super().__init__()
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f"no such FASTA file: {path}")
    self._file = tf.io.gfile.GFile(path, "rb")

  def readable(self):
    return True

  def seekable(self):
    return True

  def readinto(self, buffer) -> int:
    data = self._file.read(len(buffer))
    buffer[:len(data)] = data
    return len(data)

  def seek(self, offset, whence=io.SEEK_SET):
    self._file.seek(offset, whence)
    return self._file.tell()

  def tell(self):
    return self._file.tell()

  def close(self):
    self._file.close()
    super().close()


def open_gfile(path: str):
  """Opens a local or `gs://` file for `fasta.read_fasta` (buffered, seekable)."""
  return io.BufferedReader(_GFileRaw(path), buffer_size=1 << 20)


@gin.configurable
class FastaDataSource(seqio.DataSource):
  """FASTA files per split, read with `ankh3_jax.data.fasta.read_fasta`.

  Malformed files fail the pipeline with the reader's message (file, line, record,
  reason), wrapped in a TensorFlow error by `from_generator`.
  """

  def __init__(self, split_paths: Optional[Mapping[str, Paths]] = None, *,
               max_length: Optional[int] = None, check_duplicates: bool = False,
               shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER,
               num_input_examples: Optional[Mapping[str, int]] = None):
    """Args:
      split_paths: {split: path, glob or list}; default: the shipped corpus.
      max_length: reject (raise on) longer sequences; None accepts any length.
      check_duplicates: raise on a repeated record id within a file.
      shuffle_buffer_size: records buffered when `get_dataset(shuffle=True)`.
      num_input_examples: optional {split: count}; known for the shipped corpus.
    """
    if split_paths is None:
      split_paths = {split: corpus.corpus_path(split) for split in corpus.SPLITS}
      if num_input_examples is None:
        num_input_examples = dict(corpus.NUM_RECORDS)
    self._split_paths = {s: _expand(s, p) for s, p in split_paths.items()}
    self._max_length = max_length
    self._check_duplicates = check_duplicates
    self._shuffle_buffer_size = shuffle_buffer_size
    super().__init__(splits=tuple(self._split_paths),
                     num_input_examples=num_input_examples)

  @property
  def split_paths(self) -> Mapping[str, tuple]:
    return dict(self._split_paths)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return list(self._split_paths[split])

  def __repr__(self):
    return (f"{type(self).__name__}(split_paths={self._split_paths}, "
            f"max_length={self._max_length}, "
            f"check_duplicates={self._check_duplicates})")

  def records(self, split: str, index: int = 0, num_shards: int = 1,
              file_seed: Optional[int] = None):
    """Yields (id, sequence) of `split`; record i goes to shard i % num_shards."""
    files = list(self._split_paths[split])
    if file_seed is not None:
      random.Random(file_seed).shuffle(files)
    i = 0
    for path in files:
      for record in fasta.read_fasta(path, max_length=self._max_length,
                                     check_duplicates=self._check_duplicates,
                                     opener=open_gfile):
        if i % num_shards == index:
          yield record.id, record.sequence
        i += 1

  def get_dataset(self, split: str = "train", shuffle: bool = True,
                  seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *,
                  sequence_length=None, use_cached: bool = False,
                  num_epochs: Optional[int] = 1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # Unused, as in seqio's sources.
    if split not in self._split_paths:
      raise ValueError(f"unknown split {split!r}; this source has {self.splits}")
    index, num_shards = ((shard_info.index, shard_info.num_shards) if shard_info
                         else (0, 1))
    file_seed = (seed if seed is not None else random.randrange(2**31)) if shuffle else None

    def generate():  # Blocks of records: from_generator costs ~1 ms a call.
      ids, seqs = [], []
      for record_id, sequence in self.records(split, index, num_shards, file_seed):
        ids.append(record_id)
        seqs.append(sequence)
        if len(ids) == _BLOCK:
          yield {"id": ids, "sequence": seqs}
          ids, seqs = [], []
      if ids:
        yield {"id": ids, "sequence": seqs}

    ds = tf.data.Dataset.from_generator(generate, output_signature=_BLOCK_SIGNATURE)
    ds = ds.unbatch()
    if shuffle:
      ds = ds.shuffle(self._shuffle_buffer_size, seed=seed)
    return ds


@gin.configurable
def uniref50_tfds_source(name: str = "ankh3_uniref50:1.0.0",
                         data_dir: Optional[str] = None) -> seqio.TfdsDataSource:
  """seqio source over the prepared `ankh3_uniref50` TFDS data set."""
  from ankh3_jax.data import tfds_uniref50  # pylint: disable=g-import-not-at-top,unused-import

  return seqio.TfdsDataSource(tfds_name=name, tfds_data_dir=data_dir,
                              splits=corpus.SPLITS)
