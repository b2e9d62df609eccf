"""Shared k-mer check of held-out sequences against a training set (numpy, no TensorFlow).

The rule used for every shipped split: a held-out sequence is *homologous to training*
if at least 20% of its distinct 5-mers occur in one single training sequence.

  fractions = max_shared_kmer_fraction(heldout_seqs, train_seqs, k=5)
  homologous = fractions >= MAX_SHARED_FRACTION

K-mers are packed into integers (5 bits a letter), each sequence's distinct k-mers are
paired with its index, and held-out k-mers are looked up in the sorted training pairs; the
training set is processed in chunks of about `chunk_residues` residues, so memory stays
bounded on large corpora (8,000 x 350-residue training sequences against 1,000 held-out
take 2 s on a loaded CPU core).
"""
from typing import Sequence

import numpy as np

KMER = 5
MAX_SHARED_FRACTION = 0.2
_BITS = 5  # letters are coded as (byte & 31): A..Z -> 1..26, any case
_MAX_K = 8  # k * 5 bits plus the sequence index must fit in an int64
_CHUNK_RESIDUES = 4_000_000


def _check_k(k: int) -> None:
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= _MAX_K:
    raise ValueError(f"k must be an integer in [1, {_MAX_K}], got {k!r}")


def _sorted_unique(values: np.ndarray) -> tuple:
  """(distinct values ascending, their counts). np.sort + diff: numpy 2.4's np.unique
  took ~100x longer on 3.6M int64 values."""
  values = np.sort(values)
  starts = np.flatnonzero(np.diff(values, prepend=values[:1] - 1)) if len(values) else (
      np.zeros(0, np.int64))
  counts = np.diff(np.append(starts, len(values)))
  return values[starts], counts


def distinct_kmers(sequences: Sequence[str], k: int = KMER) -> tuple:
  """(owner, code): the distinct k-mers of every sequence as int64 codes, sorted by
  (code, owner); `owner` is the sequence's index. Sequences shorter than k have none.
  Sequences are ASCII letters (any case; other characters would share codes)."""
  _check_k(k)
  sequences = list(sequences)
  owner_bits = max(1, (len(sequences) - 1).bit_length())
  if _BITS * k + owner_bits > 63:
    raise ValueError(f"{len(sequences)} sequences at k={k} do not fit in int64 keys")
  lengths = np.fromiter((len(s) for s in sequences), np.int64, len(sequences))
  windows = int(lengths.sum()) - k + 1
  if windows <= 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  letters = np.frombuffer("".join(sequences).encode("ascii"), np.uint8)
  letters = (letters & 31).astype(np.int64)
  codes = np.zeros(windows, np.int64)
  for j in range(k):
    codes = (codes << _BITS) | letters[j:j + windows]
  owner = np.repeat(np.arange(len(sequences), dtype=np.int64), lengths)[:windows]
  starts = np.cumsum(lengths) - lengths
  inside = np.arange(windows, dtype=np.int64) - starts[owner] <= lengths[owner] - k
  keys, _ = _sorted_unique((codes[inside] << owner_bits) | owner[inside])
  return keys & ((1 << owner_bits) - 1), keys >> owner_bits


def _chunks(sequences: list, chunk_residues: int):
  """(first index, sequences) pieces of about `chunk_residues` residues (and at most
  2**20 sequences) each."""
  first, size = 0, 0
  for i, sequence in enumerate(sequences):
    size += len(sequence)
    if size >= chunk_residues or i + 1 - first >= 1 << 20:
      yield first, sequences[first:i + 1]
      first, size = i + 1, 0
  if first < len(sequences):
    yield first, sequences[first:]


def nearest_training_sequence(heldout_seqs: Sequence[str], train_seqs: Sequence[str],
                              k: int = KMER,
                              chunk_residues: int = _CHUNK_RESIDUES) -> tuple:
  """(fraction, index) per held-out sequence: the largest share of its distinct k-mers
  found in one training sequence, and that sequence's index (-1 if it shares none).

  Held-out sequences shorter than k have no k-mers: fraction 0, index -1.
  """
  heldout_owner, heldout_code = distinct_kmers(heldout_seqs, k)
  num_heldout = len(heldout_seqs)
  own_counts = np.bincount(heldout_owner, minlength=num_heldout)
  best_shared = np.zeros(num_heldout, np.int64)
  best_index = np.full(num_heldout, -1, np.int64)
  for first, chunk in _chunks(list(train_seqs), chunk_residues):
    train_owner, train_code = distinct_kmers(chunk, k)  # sorted by code
    lo = np.searchsorted(train_code, heldout_code, side="left")
    hi = np.searchsorted(train_code, heldout_code, side="right")
    hits = hi - lo
    total = int(hits.sum())
    if total == 0:
      continue
    # One row per (held-out k-mer, training sequence holding it).
    heldout_of_hit = np.repeat(heldout_owner, hits)
    run_start = np.repeat(np.cumsum(hits) - hits, hits)
    train_of_hit = train_owner[np.repeat(lo, hits) + np.arange(total) - run_start]
    pairs, shared = _sorted_unique(heldout_of_hit * len(chunk) + train_of_hit)
    pair_heldout, pair_train = pairs // len(chunk), pairs % len(chunk)
    # Per held-out sequence, the pair with the most shared k-mers (first on ties).
    order = np.lexsort((-shared, pair_heldout))
    pair_heldout, pair_train, shared = (pair_heldout[order], pair_train[order],
                                        shared[order])
    first_of_heldout = np.flatnonzero(np.diff(pair_heldout, prepend=-1))
    rows = pair_heldout[first_of_heldout]
    better = shared[first_of_heldout] > best_shared[rows]
    rows = rows[better]
    best_shared[rows] = shared[first_of_heldout][better]
    best_index[rows] = pair_train[first_of_heldout][better] + first
  fractions = best_shared / np.maximum(own_counts, 1)
  return fractions, best_index


def max_shared_kmer_fraction(heldout_seqs: Sequence[str], train_seqs: Sequence[str],
                             k: int = KMER,
                             chunk_residues: int = _CHUNK_RESIDUES) -> np.ndarray:
  """Per held-out sequence, the largest fraction of its distinct k-mers that occur in one
  single training sequence (float64 in [0, 1])."""
  return nearest_training_sequence(heldout_seqs, train_seqs, k, chunk_residues)[0]


def is_homologous(heldout_seqs: Sequence[str], train_seqs: Sequence[str],
                  k: int = KMER, threshold: float = MAX_SHARED_FRACTION) -> np.ndarray:
  """Per held-out sequence, True if >= `threshold` of its distinct k-mers occur in one
  training sequence (the rule of the shipped splits)."""
  return max_shared_kmer_fraction(heldout_seqs, train_seqs, k) >= threshold
