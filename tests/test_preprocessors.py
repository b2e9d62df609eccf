"""Tokenize, crop, MLM and completion preprocessors on real corpus sequences."""
import collections
import math

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest
import seqio
import tensorflow as tf

from ankh3_jax import vocab
from ankh3_jax.data import corpus
from ankh3_jax.data import fasta
from ankh3_jax.data import preprocessors as prep

NLU, S2S, V = 3, 4, 256
LENGTHS = {"inputs": 512, "targets": 512}


@pytest.fixture(scope="module")
def features():
  v = vocab.get_vocabulary()
  return {k: seqio.Feature(v, add_eos=True) for k in ("inputs", "targets")}


@pytest.fixture(scope="module")
def sequences():
  return [r.sequence for r in fasta.read_fasta(corpus.corpus_path("validation"))]


def run(features, preprocessors, sequences, seed=0, sequence_length=None):
  ds = tf.data.Dataset.from_tensor_slices({"sequence": list(sequences)})
  with seqio.utils.map_seed_manager(seed):
    for fn in preprocessors:
      fn = seqio.utils.add_kwargs_to_transform(
          fn, output_features=features, sequence_length=sequence_length)
      ds = fn(ds)
  return list(ds.as_numpy_iterator())


def expected_masked(n, p, cap=vocab.NUM_SENTINELS):
  return min(max(math.floor(p * n + 0.5), 1), n, cap)


def ids(sequence):
  return vocab.get_processor().encode(sequence)


def mlm(p, **kwargs):
  return lambda ds, output_features, sequence_length: prep.mask_residues(
      ds, probability=p, output_features=output_features,
      sequence_length=sequence_length, **kwargs)


def test_tokenize_one_id_per_residue(features):
  seqs = [vocab.RESIDUES, vocab.RESIDUES.lower(), "MKV"]
  out = run(features, [prep.tokenize], seqs)
  for s, ex in zip(seqs, out):
    assert list(ex["residues"]) == ids(s.upper()) and len(ex["residues"]) == len(s)
  assert len(set(out[0]["residues"])) == len(vocab.RESIDUES)
  assert min(out[0]["residues"]) > S2S and max(out[0]["residues"]) < V - vocab.NUM_SENTINELS


def test_mlm_layout_matches_the_paper_example(features):
  ex = run(features, [prep.tokenize, mlm(0.34)], ["MKAYVL"], seed=3)[0]
  inputs, targets = list(ex["inputs"]), list(ex["targets"])
  assert inputs[0] == NLU and len(inputs) == 7 and len(targets) == 4
  positions = [i for i, t in enumerate(inputs) if t >= V - vocab.NUM_SENTINELS]
  assert [inputs[i] for i in positions] == [vocab.sentinel_id(0, V), vocab.sentinel_id(1, V)]
  assert targets[0::2] == [255, 254]
  assert targets[1::2] == [ids("MKAYVL")[i - 1] for i in positions]
  assert prep.reconstruct_mlm(inputs, targets) == ids("MKAYVL")


@pytest.mark.parametrize("p", prep.DEFAULT_MASKING_PROBABILITIES)
def test_mlm_rate_positions_and_reconstruction(features, sequences, p):
  out = run(features, [prep.tokenize, mlm(p)], sequences, seed=11)
  total_n = total_m = first_half = uncapped = 0
  expected_first_half = 0.0
  for s, ex in zip(sequences, out):
    n, m = len(s), len(ex["targets"]) // 2
    assert m == expected_masked(n, p)
    assert len(ex["inputs"]) == n + 1
    assert prep.reconstruct_mlm(ex["inputs"], ex["targets"]) == ids(s)
    masked = np.flatnonzero(ex["inputs"][1:] >= V - vocab.NUM_SENTINELS)
    first_half += int(np.sum(masked < n // 2))
    expected_first_half += m * (n // 2) / n
    if p * n < vocab.NUM_SENTINELS - 1:  # below the sentinel cap
      total_n, total_m, uncapped = total_n + n, total_m + m, uncapped + 1
  # Exact counts: the pooled rate is p up to rounding (<= 0.5 residue per example).
  assert uncapped > 0.75 * len(sequences)
  assert abs(total_m / total_n - p) <= 0.5 * uncapped / total_n
  # Positions are uniform: the first half of each sequence gets its share of the masks.
  all_masks = sum(expected_masked(len(s), p) for s in sequences)
  assert abs(first_half - expected_first_half) < 4 * math.sqrt(0.25 * all_masks)


def test_mlm_is_never_capped_silently(features):
  seq = "ACDEFGHIKLMNPQRSTVWY" * 100  # 2000 residues
  # Direct use without feature lengths: capped at the sentinels (documented).
  ex = run(features, [prep.tokenize, mlm(0.3)], [seq])[0]
  assert len(ex["targets"]) == 2 * vocab.NUM_SENTINELS
  assert prep.reconstruct_mlm(ex["inputs"], ex["targets"]) == ids(seq)
  # With feature lengths, a configuration that would cap fails when the dataset is built.
  with pytest.raises(prep.MaskingCapError,
                     match=r"inputs=128, targets=64.*masks 38.*needs 77.*capped at 31 "
                           r"masked \(24\.6% instead of 30\.0%\).*'targets'\] >= 77"):
    run(features, [prep.tokenize, prep.random_crop, mlm(0.3)], [seq],
        sequence_length={"inputs": 128, "targets": 64})
  with pytest.raises(prep.MaskingCapError, match=r"226 sentinels.*'inputs'\] <= 756"):
    run(features, [prep.tokenize, prep.random_crop, mlm(0.3)], [seq],
        sequence_length={"inputs": 2100, "targets": 2100})
  with pytest.raises(prep.MaskingCapError, match=r"p=0\.3 "):  # the sampled task's highest
    run(features, [prep.tokenize, prep.random_crop, prep.mask_residues_sampled], [seq],
        sequence_length={"inputs": 128, "targets": 64})
  assert prep.required_targets_length(0.3, 128) == 77
  assert prep.required_targets_length(0.3, 756) <= 2 * vocab.NUM_SENTINELS + 1
  assert prep.required_targets_length(0.3, 757) > 2 * vocab.NUM_SENTINELS + 1
  ex = run(features, [prep.tokenize, prep.random_crop, mlm(0.3)], [seq],
           sequence_length={"inputs": 128, "targets": 77})[0]
  assert len(ex["inputs"]) == 127 and len(ex["targets"]) == 2 * 38
  ex = run(features, [prep.tokenize, prep.random_crop, mlm(0.3)], [seq],
           sequence_length=LENGTHS)[0]
  assert len(ex["inputs"]) == 511 and len(ex["targets"]) == 2 * 153
  ex = run(features, [prep.tokenize, mlm(0.15)], ["MK"])[0]
  assert len(ex["targets"]) == 2  # at least one masked residue


def test_crop_keeps_a_random_contiguous_window(features):
  seq = "".join(vocab.RESIDUES[i % 20] + vocab.RESIDUES[(i // 20) % 20]
                for i in range(500))  # 1000 residues, windows are distinguishable
  crop = lambda ds, sequence_length: prep.random_crop(
      ds, sequence_length=sequence_length, max_residues=100)
  out = run(features, [prep.tokenize, crop], [seq] * 50 + ["MKV"], seed=5,
            sequence_length=LENGTHS)
  full = ids(seq)
  starts = set()
  for ex in out[:-1]:
    window = list(ex["residues"])
    assert len(window) == 100
    start = next(i for i in range(len(full) - 99) if full[i:i + 100] == window)
    starts.add(start)
  assert len(starts) > 40 and list(out[-1]["residues"]) == ids("MKV")
  out = run(features, [prep.tokenize, prep.random_crop], [seq], sequence_length=LENGTHS)
  assert len(out[0]["residues"]) == 510  # default: what fits 512 with prefix and eos


def test_mlm_sampled_draws_each_probability(features, sequences):
  preps = [prep.tokenize, prep.random_crop, prep.mask_residues_sampled]
  out = run(features, preps, sequences * 4, seed=2, sequence_length=LENGTHS)
  counts = collections.Counter()
  for ex in out:
    n, m = len(ex["inputs"]) - 1, len(ex["targets"]) // 2
    assert prep.reconstruct_mlm(ex["inputs"], ex["targets"])
    matches = [p for p in prep.DEFAULT_MASKING_PROBABILITIES if expected_masked(n, p) == m]
    assert matches
    if len(matches) == 1:
      counts[matches[0]] += 1
  total = sum(counts.values())
  assert total > 0.9 * len(out)
  for p in prep.DEFAULT_MASKING_PROBABILITIES:
    assert abs(counts[p] / total - 1 / 3) < 4 * math.sqrt(2 / 9 / total)


def _completion_window(ex):
  """Residue ids of a completion example and whether its targets end with eos."""
  assert ex["inputs"][0] == S2S and ex["inputs"][-1] == vocab.EOS_ID
  at_end = ex["targets"][-1] == vocab.EOS_ID
  targets = list(ex["targets"][:-1] if at_end else ex["targets"])
  return list(ex["inputs"][1:-1]) + targets, bool(at_end)


def test_completion_half_split(features, sequences):
  out = run(features, [prep.tokenize, prep.complete_sequence], sequences + ["M", "MK", "MKV"])
  assert len(out) == len(sequences) + 2  # the 1-residue sequence is dropped
  for s, ex in zip(sequences + ["MK", "MKV"], out):
    window, at_end = _completion_window(ex)
    assert window == ids(s) and at_end  # no lengths: the whole protein, eos at its end
    assert len(ex["inputs"]) - 2 == max(len(s) // 2, 1)
    assert len(ex["targets"]) >= 2


def test_completion_random_split_range(features, sequences):
  fn = lambda ds, output_features: prep.complete_sequence(
      ds, split_range=(0.2, 0.8), output_features=output_features)
  out = run(features, [prep.tokenize, fn], sequences, seed=4)
  fractions = []
  for s, ex in zip(sequences, out):
    cut = len(ex["inputs"]) - 2
    assert _completion_window(ex)[0] == ids(s)
    assert 1 <= cut <= len(s) - 1
    assert 0.2 - 1 / len(s) <= cut / len(s) < 0.8 + 1 / len(s)
    fractions.append(cut / len(s))
  assert abs(np.mean(fractions) - 0.5) < 0.04 and np.std(fractions) > 0.12
  with pytest.raises(ValueError):
    prep.complete_sequence(tf.data.Dataset.range(1), split_fraction=1.0)
  with pytest.raises(ValueError, match="window"):
    prep.complete_sequence(tf.data.Dataset.range(1), window="middle")


def test_completion_eos_only_at_the_real_c_terminus(features):
  """A window of min(64 - 2, 32 - 1) = 31 residues: from the N-terminus by default (as
  inference prompts), at random with window='random'; eos ends the targets only when the
  window reaches the protein's end."""
  long_seq = "".join(vocab.RESIDUES[i % 20] + vocab.RESIDUES[(i // 20) % 20]
                     for i in range(50))  # 100 residues, windows are distinguishable
  short_seq = "MKVLAAGIVG"
  lengths = {"inputs": 64, "targets": 32}
  out = run(features, [prep.tokenize, prep.complete_sequence], [long_seq, short_seq],
            sequence_length=lengths)
  assert _completion_window(out[0]) == (ids(long_seq)[:31], False)
  assert len(out[0]["inputs"]) - 2 == 15 and len(out[0]["targets"]) == 16
  assert _completion_window(out[1]) == (ids(short_seq), True)
  rand = lambda ds, output_features, sequence_length: prep.complete_sequence(
      ds, window="random", output_features=output_features, sequence_length=sequence_length)
  out = run(features, [prep.tokenize, rand], [long_seq] * 60, seed=3, sequence_length=lengths)
  full, starts = ids(long_seq), set()
  for ex in out:
    window, at_end = _completion_window(ex)
    start = next(i for i in range(len(full) - 30) if full[i:i + 31] == window)
    starts.add(start)
    assert at_end == (start + 31 == len(full))
  assert len(starts) > 30 and 0 in starts


def test_seed_determinism(features, sequences):
  preps = [prep.tokenize, prep.random_crop, prep.mask_residues_sampled]
  a = run(features, preps, sequences[:100], seed=7, sequence_length=LENGTHS)
  b = run(features, preps, sequences[:100], seed=7, sequence_length=LENGTHS)
  c = run(features, preps, sequences[:100], seed=8, sequence_length=LENGTHS)
  flat = lambda out: [(tuple(e["inputs"]), tuple(e["targets"])) for e in out]
  assert flat(a) == flat(b) and flat(a) != flat(c)


def test_reconstruct_mlm_rejects_inconsistent_pairs():
  assert prep.reconstruct_mlm([NLU, 16, 255, 5, 1, 0], [255, 14, 1, 0, 0]) == [16, 14, 5]
  with pytest.raises(ValueError):
    prep.reconstruct_mlm([NLU, 254, 5], [254, 14])  # must start at <extra_id_0>
  with pytest.raises(ValueError):
    prep.reconstruct_mlm([NLU, 255, 5], [255, 14, 254, 7])  # unmatched sentinel
  with pytest.raises(ValueError):
    prep.reconstruct_mlm([NLU, 255, 5], [255])


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
    st.lists(st.text(vocab.RESIDUES, min_size=1, max_size=700), min_size=1, max_size=6),
    st.floats(0.01, 0.6), st.integers(0, 2**30))
def test_fuzz_mlm_reconstruction(features, seqs, p, seed):
  out = run(features, [prep.tokenize, mlm(p)], seqs, seed=seed)
  for s, ex in zip(seqs, out):
    assert prep.reconstruct_mlm(ex["inputs"], ex["targets"]) == ids(s)
    assert len(ex["targets"]) // 2 == expected_masked(len(s), p)


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(
    st.lists(st.one_of(st.text(vocab.RESIDUES, min_size=2, max_size=40),
                       st.integers(100, 20000).map(lambda n: "ACDEFGHIKLMNPQRSTVWY" * n)),
             min_size=1, max_size=4),
    st.sampled_from([(32, 32), (64, 16), (128, 80)]), st.integers(0, 2**30))
def test_fuzz_any_length_fits_the_feature_lengths(features, seqs, lengths, seed):
  """Sequences of any length, up to 400,000 residues, come out of both objectives'
  pipelines within the feature lengths (crop, then MLM or completion) and decode back
  to a contiguous window of the input; completion targets end with eos exactly when the
  window reaches the protein's end. (MLM at 0.3 needs targets >= 41 at inputs 64: that
  pair is checked to fail instead.)"""
  lengths = dict(zip(("inputs", "targets"), lengths))
  pipelines = [[prep.tokenize, prep.complete_sequence]]
  mlm_pipeline = [prep.tokenize, prep.random_crop, mlm(0.3)]
  if lengths["targets"] >= prep.required_targets_length(0.3, lengths["inputs"]):
    pipelines.append(mlm_pipeline)
  else:
    with pytest.raises(prep.MaskingCapError):
      run(features, mlm_pipeline, seqs, seed=seed, sequence_length=lengths)
  for preps in pipelines:
    out = run(features, preps, seqs, seed=seed, sequence_length=lengths)
    for s, ex in zip(seqs, out):
      full = ids(s)
      if preps[-1] is prep.complete_sequence:
        assert len(ex["inputs"]) <= lengths["inputs"]
        assert len(ex["targets"]) <= lengths["targets"]
        window, at_end = _completion_window(ex)
        assert at_end == (full[-len(window):] == window)
      else:
        assert len(ex["inputs"]) < lengths["inputs"]  # room for eos
        window = prep.reconstruct_mlm(ex["inputs"], ex["targets"])
      assert any(full[i:i + len(window)] == window for i in range(len(full) - len(window) + 1))
