"""seqio preprocessors for the Ankh3 objectives: tokenize, crop, MLM and completion.

An MLM task runs: source {"id", "sequence"} -> `tokenize` -> `random_crop` ->
`mask_residues` (or `mask_residues_sampled`) -> seqio's `append_eos_after_trim`; the
completion task: `tokenize` -> `complete_sequence` (window, cut and eos in one step).
Randomness is stateless and drawn from seqio's per-map seeds, so a Task's output is a
function of the seed given to `get_dataset`.

Documented choices (see docs/data.md):
  * masked count: exactly m = floor(p * n + 0.5) of the n residues (at least 1), at
    uniformly random positions. Never capped silently: when the feature lengths are
    known, a probability whose longest example (n = inputs - 2 residues) needs more
    target tokens (2m + 1) or sentinels than there are raises `MaskingCapError` when the
    dataset is built (`required_targets_length` says what fits). Only direct calls
    without feature lengths cap at the number of sentinels (226);
  * sentinels count from `<extra_id_0>` (the highest id) left to right, one per residue;
  * MLM crop: one random window of at most inputs - 2 residues, so prefix + residues +
    eos fit; eos is appended to inputs and targets;
  * completion: a window of at most min(inputs - 2, targets - 1) residues, starting at the
    N-terminus (default, as inference prompts) or at random (`window`); cut at
    floor(f * n) kept within [1, n - 1]; inputs get eos, targets get eos only when the
    window reaches the protein's real C-terminus (a crop's end is not the protein's);
    sequences under 2 residues are dropped.
"""
import math
from typing import Mapping, Optional, Sequence, Tuple

import gin
import numpy as np
import seqio
import tensorflow as tf

from ankh3_jax import vocab as vocab_lib

DEFAULT_MASKING_PROBABILITIES = (0.15, 0.20, 0.30)
DEFAULT_COMPLETION_SPLIT = 0.5
RESIDUES_KEY = "residues"


def _vocabulary(output_features: Optional[Mapping[str, seqio.Feature]]):
  if output_features and "inputs" in output_features:
    return output_features["inputs"].vocabulary
  return vocab_lib.get_vocabulary()


def piece_id(vocabulary, piece: str) -> int:
  """Id of one SentencePiece piece (e.g. '[NLU]' or 'M'); raises if it is unknown."""
  index = vocabulary.tokenizer.piece_to_id(piece)
  if index == vocabulary.tokenizer.unk_id():
    raise ValueError(f"piece {piece!r} is not in the vocabulary")
  return index


def residue_table(vocabulary) -> np.ndarray:
  """Byte -> token id table: one id per residue letter (either case), else `<unk>`."""
  table = np.full(256, vocabulary.unk_id, np.int32)
  for letter in vocab_lib.RESIDUES:
    table[ord(letter)] = table[ord(letter.lower())] = piece_id(vocabulary, letter)
  return table


def max_residues_for(sequence_length: Optional[Mapping[str, int]],
                     fit_targets: bool = True) -> Optional[int]:
  """Most residues that fit the inputs with a prefix token and eos (and, if
  `fit_targets`, also the targets with eos, as completion needs)."""
  if not sequence_length:
    return None
  limit = sequence_length["inputs"] - 2
  if fit_targets:
    limit = min(limit, sequence_length["targets"] - 1)
  return limit


def tokenize(dataset: tf.data.Dataset, output_features=None, key: str = "sequence",
             output_key: str = RESIDUES_KEY) -> tf.data.Dataset:
  """Adds `output_key`: the residue ids of `key`, exactly one id per residue."""
  table = tf.constant(residue_table(_vocabulary(output_features)))

  @seqio.map_over_dataset
  def fn(ex):
    ex = dict(ex)
    raw = tf.cast(tf.io.decode_raw(ex[key], tf.uint8), tf.int32)
    ex[output_key] = tf.gather(table, raw)
    return ex

  return fn(dataset)


@gin.configurable
def random_crop(dataset: tf.data.Dataset, sequence_length=None,
                max_residues: Optional[int] = None,
                key: str = RESIDUES_KEY) -> tf.data.Dataset:
  """MLM's crop: keeps one uniformly placed window of at most `max_residues` residues.

  The limit is the smaller of `max_residues` and what fits the inputs with the prefix
  and eos (inputs - 2); with neither known, the dataset is returned unchanged. The
  targets are sized by the masking check (`check_masking_fits`), not by the crop.
  """
  derived = max_residues_for(sequence_length, fit_targets=False)
  limits = [x for x in (max_residues, derived) if x]
  if not limits:
    return dataset
  limit = min(limits)
  if limit < 1:
    raise ValueError(f"crop length must be >= 1, got {limit}")

  @seqio.map_over_dataset(num_seeds=1)
  def fn(ex, seed):
    tokens = ex[key]
    slack = tf.maximum(tf.size(tokens) - limit, 0)
    start = tf.random.stateless_uniform([], seed, minval=0, maxval=slack + 1,
                                        dtype=tf.int32)
    ex = dict(ex)
    ex[key] = tokens[start:start + limit]
    return ex

  return fn(dataset)


def num_masked(n, probability, cap):
  """Masked residue count: floor(p * n + 0.5), at least 1, at most min(n, cap)."""
  n64 = tf.cast(n, tf.float64)
  m = tf.cast(tf.floor(tf.cast(probability, tf.float64) * n64 + 0.5), tf.int32)
  return tf.minimum(tf.maximum(m, 1), tf.minimum(n, cap))


def _mask(tokens, probability, seed, prefix_id: int, vocab_size: int, cap: int):
  """T5-sentinel masking of single residues; returns (inputs, targets) without eos."""
  n = tf.size(tokens)
  m = num_masked(n, probability, cap)
  chosen = tf.argsort(tf.random.stateless_uniform([n], seed))[:m]
  mask = tf.scatter_nd(chosen[:, None], tf.ones([m], tf.int32), [n]) > 0
  sentinels = vocab_size - tf.cumsum(tf.cast(mask, tf.int32))  # <extra_id_k> = V-1-k
  inputs = tf.concat([[prefix_id], tf.where(mask, sentinels, tokens)], axis=0)
  pairs = tf.stack([tf.boolean_mask(sentinels, mask), tf.boolean_mask(tokens, mask)], 1)
  return inputs, tf.reshape(pairs, [-1])


class MaskingCapError(ValueError):
  """The feature lengths cannot hold the masked residues a probability asks for."""


def required_targets_length(probability: float, inputs_length: int) -> int:
  """Target tokens the longest MLM example at `inputs_length` needs: a sentinel and a
  residue per masked residue, then eos."""
  n = max(inputs_length - 2, 1)
  return 2 * max(math.floor(probability * n + 0.5), 1) + 1


def check_masking_fits(probability: float, sequence_length: Mapping[str, int],
                       num_sentinels: int) -> None:
  """Raises MaskingCapError if MLM at `probability` would be capped at these lengths."""
  inputs, targets = sequence_length["inputs"], sequence_length["targets"]
  n = max(inputs - 2, 1)
  needed = required_targets_length(probability, inputs)
  m = (needed - 1) // 2
  cap = min(num_sentinels, (targets - 1) // 2)
  if m > cap:
    if m <= num_sentinels:
      fix = f"TASK_FEATURE_LENGTHS['targets'] >= {needed}"
    else:  # more masked residues than sentinels: the inputs must shrink
      longest = next(i for i in range(inputs, 2, -1)
                     if required_targets_length(probability, i) <= 2 * num_sentinels + 1)
      fix = (f"TASK_FEATURE_LENGTHS['inputs'] <= {longest} with 'targets' >= "
             f"{required_targets_length(probability, longest)}")
    raise MaskingCapError(
        f"MLM at p={probability:g} with feature lengths inputs={inputs}, "
        f"targets={targets}: an example of {n} residues masks {m}, which needs "
        f"{needed} target tokens and {m} of the {num_sentinels} sentinels; it would be "
        f"capped at {cap} masked ({cap / n:.1%} instead of {probability:.1%}). Set {fix}.")


def _mask_settings(output_features, sequence_length, max_masked,
                   probabilities: Sequence[float]) -> Tuple[int, int, int]:
  vocabulary = _vocabulary(output_features)
  cap = vocabulary.extra_ids if max_masked is None else min(max_masked,
                                                            vocabulary.extra_ids)
  if sequence_length and "targets" in sequence_length and "inputs" in sequence_length:
    check_masking_fits(max(probabilities), sequence_length, vocabulary.extra_ids)
    cap = min(cap, (sequence_length["targets"] - 1) // 2)
  if cap < 1:
    raise ValueError("no room for a masked residue: need sentinels and targets >= 3")
  return piece_id(vocabulary, vocab_lib.NLU_TOKEN), vocabulary.vocab_size, cap


def _check_probability(p: float) -> float:
  if not 0.0 < p < 1.0:
    raise ValueError(f"masking probability must be in (0, 1), got {p}")
  return float(p)


def mask_residues(dataset: tf.data.Dataset, probability: float = 0.15,
                  output_features=None, sequence_length=None,
                  max_masked: Optional[int] = None,
                  key: str = RESIDUES_KEY) -> tf.data.Dataset:
  """MLM: inputs `[NLU]` + residues with m replaced by sentinels, targets the pairs.

  Example (sentinels shown as <k>): residues `MKAYVL`, masked K and V ->
  inputs `[NLU] M <0> A Y <1> L`, targets `<0> K <1> V`.
  """
  probability = _check_probability(probability)
  prefix_id, vocab_size, cap = _mask_settings(output_features, sequence_length,
                                              max_masked, [probability])

  @seqio.map_over_dataset(num_seeds=1)
  def fn(ex, seed):
    inputs, targets = _mask(ex[key], probability, seed, prefix_id, vocab_size, cap)
    return {"inputs": inputs, "targets": targets}

  return fn(dataset)


def mask_residues_sampled(
    dataset: tf.data.Dataset,
    probabilities: Sequence[float] = DEFAULT_MASKING_PROBABILITIES,
    output_features=None, sequence_length=None, max_masked: Optional[int] = None,
    key: str = RESIDUES_KEY) -> tf.data.Dataset:
  """MLM with the probability drawn per example uniformly from `probabilities`."""
  probs = tf.constant([_check_probability(p) for p in probabilities], tf.float64)
  prefix_id, vocab_size, cap = _mask_settings(output_features, sequence_length,
                                              max_masked, probabilities)

  @seqio.map_over_dataset(num_seeds=2)
  def fn(ex, seeds):
    index = tf.random.stateless_uniform([], seeds[0], minval=0,
                                        maxval=len(probabilities), dtype=tf.int32)
    inputs, targets = _mask(ex[key], probs[index], seeds[1], prefix_id, vocab_size, cap)
    return {"inputs": inputs, "targets": targets}

  return fn(dataset)


COMPLETION_WINDOWS = ("n_terminus", "random")


@gin.configurable
def complete_sequence(dataset: tf.data.Dataset,
                      split_fraction: float = DEFAULT_COMPLETION_SPLIT,
                      split_range: Optional[Tuple[float, float]] = None,
                      window: str = "n_terminus",
                      output_features=None, sequence_length=None,
                      key: str = RESIDUES_KEY) -> tf.data.Dataset:
  """Completion: inputs `[S2S]` + w[:cut] + eos, targets w[cut:] (+ eos at the C-terminus).

  w is a window of at most `max_residues_for(sequence_length)` residues (the whole
  sequence when the lengths are unknown) starting at the N-terminus, as inference's
  `--cut` prompts do, or, with window='random', at a uniformly drawn position. The
  targets end with eos only when w reaches the sequence's real end: the model is never
  taught that a protein stops where a crop stopped. cut = floor(f * len(w)) kept within
  [1, len(w) - 1], with f = `split_fraction`, or drawn per example from `split_range` =
  (low, high). Sequences shorter than 2 residues are dropped.
  """
  if split_range is not None:
    low, high = (float(x) for x in split_range)
    if not 0.0 <= low < high <= 1.0:
      raise ValueError(f"split_range must satisfy 0 <= low < high <= 1, got {split_range}")
  elif not 0.0 < split_fraction < 1.0:
    raise ValueError(f"split_fraction must be in (0, 1), got {split_fraction}")
  if window not in COMPLETION_WINDOWS:
    raise ValueError(f"window must be one of {COMPLETION_WINDOWS}, got {window!r}")
  vocabulary = _vocabulary(output_features)
  prefix_id = piece_id(vocabulary, vocab_lib.S2S_TOKEN)
  eos = tf.constant([vocabulary.eos_id], tf.int32)
  limit = max_residues_for(sequence_length, fit_targets=True)
  if limit is not None and limit < 2:
    raise ValueError(f"completion needs room for 2 residues, feature lengths {sequence_length}")

  @seqio.map_over_dataset(num_seeds=2)
  def fn(ex, seeds):
    tokens = ex[key]
    n = tf.size(tokens)
    if limit is not None:
      slack = tf.maximum(n - limit, 0)
      start = (tf.random.stateless_uniform([], seeds[0], minval=0, maxval=slack + 1,
                                           dtype=tf.int32) if window == "random" else 0)
      tokens = tokens[start:start + limit]
      at_end = start + tf.size(tokens) >= n
    else:
      at_end = tf.constant(True)
    size = tf.size(tokens)
    if split_range is None:
      fraction = tf.constant(split_fraction, tf.float64)
    else:
      fraction = tf.random.stateless_uniform([], seeds[1], minval=low, maxval=high,
                                             dtype=tf.float64)
    cut = tf.cast(tf.floor(fraction * tf.cast(size, tf.float64)), tf.int32)
    cut = tf.clip_by_value(cut, 1, size - 1)
    targets = tokens[cut:]
    targets = tf.cond(at_end, lambda: tf.concat([targets, eos], 0), lambda: targets)
    return {"inputs": tf.concat([[prefix_id], tokens[:cut], eos], axis=0),
            "targets": targets}

  return fn(dataset.filter(lambda ex: tf.size(ex[key]) >= 2))


def _strip_eos(ids, eos_id: int, pad_id: int) -> list:
  ids = [int(i) for i in ids]
  while ids and ids[-1] == pad_id:
    ids.pop()
  if ids and ids[-1] == eos_id:
    ids.pop()
  return ids


def reconstruct_mlm(inputs, targets, vocab_size: int = 256,
                    num_sentinels: int = vocab_lib.NUM_SENTINELS,
                    eos_id: int = vocab_lib.EOS_ID, pad_id: int = vocab_lib.PAD_ID) -> list:
  """Residue ids of an MLM example, rebuilt from its inputs and targets.

  Accepts ids with or without trailing eos / padding; drops the prefix token. Raises
  ValueError if the pair is inconsistent (sentinels out of order, unmatched, repeated).
  """
  inputs = _strip_eos(inputs, eos_id, pad_id)[1:]
  targets = _strip_eos(targets, eos_id, pad_id)
  first_sentinel = vocab_size - num_sentinels
  if len(targets) % 2:
    raise ValueError(f"targets must be (sentinel, residue) pairs, got {len(targets)} ids")
  expected = [vocab_size - 1 - k for k in range(len(targets) // 2)]
  if targets[0::2] != expected:
    raise ValueError(f"target sentinels out of order: {targets[0::2]}")
  in_sentinels = [i for i in inputs if i >= first_sentinel]
  if in_sentinels != expected:
    raise ValueError(f"input sentinels {in_sentinels} do not match targets {expected}")
  fills = dict(zip(targets[0::2], targets[1::2]))
  return [fills[i] if i >= first_sentinel else i for i in inputs]
