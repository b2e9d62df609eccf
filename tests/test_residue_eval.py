"""Residue-level metrics: baselines on hand-made packed batches, sums, intervals, alpha."""
import math

import jax
import numpy as np
import pytest

from ankh3_jax import vocab
from ankh3_jax.training import residue_eval

PROC = vocab.get_processor()
RES = {c: PROC.piece_to_id(c) for c in vocab.RESIDUES}
NLU, S2S, EOS, SENTINEL = 3, 4, vocab.EOS_ID, 255
ALPHA = 10.0


@pytest.fixture
def stats():
  counts = tuple(100 + 10 * i for i in range(len(vocab.RESIDUES)))
  return residue_eval.ResidueStats(tuple(RES[c] for c in vocab.RESIDUES), counts, ALPHA,
                                   EOS, 256 - vocab.NUM_SENTINELS, 1000, "test")


def _row(parts, length):
  tokens, segments = [], []
  for segment, part in enumerate(parts, 1):
    tokens += part
    segments += [segment] * len(part)
  pad = length - len(tokens)
  return tokens + [0] * pad, segments + [0] * pad


def _batch():
  """Row 0 packs two MLM examples, row 1 one completion example."""
  a, c, d, e, k = (RES[x] for x in "ACDEK")
  enc0, seg_e0 = _row([[NLU, a, SENTINEL, c, EOS], [NLU, d, d, SENTINEL, EOS]], 12)
  dec0, seg_d0 = _row([[SENTINEL, k, EOS], [SENTINEL, e, EOS]], 8)
  enc1, seg_e1 = _row([[S2S, a, a, EOS]], 12)
  dec1, seg_d1 = _row([[a, c, a, EOS]], 8)
  batch = {"encoder_input_tokens": np.array([enc0, enc1]),
           "encoder_segment_ids": np.array([seg_e0, seg_e1]),
           "decoder_target_tokens": np.array([dec0, dec1]),
           "decoder_segment_ids": np.array([seg_d0, seg_d1])}
  batch["decoder_loss_weights"] = (batch["decoder_target_tokens"] > 0).astype(np.float32)
  return batch


def test_baselines_per_token(stats):
  out = residue_eval.annotate_batch(_batch(), stats, 256)
  u = np.exp(stats.log_unigram)
  idx = {c: vocab.RESIDUES.index(c) for c in "ACDEK"}
  residue_positions = [(0, 1), (0, 4), (1, 0), (1, 1), (1, 2)]
  assert sorted(zip(*np.nonzero(out["residue_weights"]))) == residue_positions
  assert sorted(zip(*np.nonzero(out["eos_weights"]))) == [(0, 2), (0, 5), (1, 3)]
  assert sorted(zip(*np.nonzero(out["sentinel_weights"]))) == [(0, 0), (0, 3)]
  assert out["encoder_residue_weights"].sum() == 4 + 2
  for (b, i), letter in zip(residue_positions, "KEACA"):
    assert out["unigram_ce"][b, i] == pytest.approx(-math.log(u[idx[letter]]), rel=1e-5)
  # Composition: the example's visible input residues plus its earlier target residues.
  expected = {
      (0, 1): (0 + ALPHA * u[idx["K"]]) / (2 + ALPHA),  # sees A, C
      (0, 4): (0 + ALPHA * u[idx["E"]]) / (2 + ALPHA),  # sees D, D (not row 0's K)
      (1, 0): (2 + ALPHA * u[idx["A"]]) / (2 + ALPHA),  # prompt A A
      (1, 1): (0 + ALPHA * u[idx["C"]]) / (3 + ALPHA),  # A A + A
      (1, 2): (3 + ALPHA * u[idx["A"]]) / (4 + ALPHA)}  # A A + A C
  for (b, i), p in expected.items():
    assert out["composition_ce"][b, i] == pytest.approx(-math.log(p), rel=1e-5)
  assert out["composition_correct"][1, 2] == 1 and out["composition_correct"][1, 1] == 0
  assert out["unigram_ce"][0, 0] == 0 and out["composition_ce"][1, 3] == 0  # not residues


def test_sums_and_metrics(stats):
  batch = residue_eval.annotate_batch(_batch(), stats, 256)
  ce = np.zeros((2, 8), np.float32)
  correct = np.zeros((2, 8), np.float32)
  ce[0, 1], ce[0, 4], ce[1, 0], ce[1, 1], ce[1, 2] = 1.0, 2.0, 0.5, 0.5, 1.0
  ce[0, 2], ce[0, 5], ce[1, 3] = 0.1, 0.3, 0.2  # eos
  correct[1, 0] = correct[0, 2] = 1.0
  sums = jax.jit(residue_eval.per_example_sums)(
      {k: np.asarray(v) for k, v in batch.items()}, ce, correct)
  acc = residue_eval.ResidueAccumulator(bootstrap_samples=200)
  acc.add(np.asarray(sums))
  m = acc.result()
  assert m["residues"] == 5 and m["sequences"] == 3
  assert m["residue_loss"] == pytest.approx(5.0 / 5)
  assert m["residue_accuracy"] == pytest.approx(1 / 5)
  assert m["residue_perplexity"] == pytest.approx(math.e)
  assert m["unigram_loss"] == pytest.approx(batch["unigram_ce"].sum() / 5, rel=1e-5)
  assert m["composition_loss"] == pytest.approx(batch["composition_ce"].sum() / 5, rel=1e-5)
  assert m["gap_unigram"] == pytest.approx(m["unigram_loss"] - 1.0, rel=1e-5)
  assert m["eos_loss"] == pytest.approx(0.2) and m["eos_accuracy"] == pytest.approx(1 / 3)
  # MLM examples only (they have sentinels): 2 masked of 2 + 4 residues.
  assert m["masking_rate"] == pytest.approx(2 / 6)
  assert m["residue_loss_ci_low"] <= m["residue_loss"] <= m["residue_loss_ci_high"]


def test_bootstrap_interval_covers_and_shrinks():
  rng = np.random.default_rng(0)

  def interval(count):
    acc = residue_eval.ResidueAccumulator()
    sums = np.zeros((len(residue_eval.SUM_KEYS), count))
    n = rng.integers(5, 40, count).astype(float)
    sums[0] = n
    sums[1] = n * (2.5 + 0.3 * rng.standard_normal(count))
    sums[3] = n * 2.9
    sums[5] = n * 2.85
    acc.add(sums)
    m = acc.result()
    assert m["gap_unigram_ci_low"] < m["gap_unigram"] < m["gap_unigram_ci_high"]
    assert m["gap_unigram"] == pytest.approx(2.9 - m["residue_loss"])
    return m["residue_loss_ci_high"] - m["residue_loss_ci_low"]

  assert interval(2000) < 0.5 * interval(100)


def test_alpha_follows_how_much_compositions_vary():
  rng = np.random.default_rng(1)
  letters = np.array(list(vocab.RESIDUES[:20]))
  base = rng.dirichlet(np.ones(20))
  same = ["".join(rng.choice(letters, 300, p=base)) for _ in range(300)]
  own = ["".join(rng.choice(letters, 300, p=rng.dirichlet(0.3 * np.ones(20))))
         for _ in range(300)]
  alpha = lambda seqs: residue_eval.estimate_stats(seqs, list(RES.values()), EOS, 30,
                                                   "t").alpha
  assert alpha(same) >= 300 and alpha(own) <= 20


def test_stats_are_stored_once(tmp_path, stats):
  path = str(tmp_path / "stats.json")
  calls = []
  estimate = lambda: calls.append(1) or stats
  assert residue_eval.load_or_estimate(path, "k", estimate) == stats
  assert residue_eval.load_or_estimate(path, "k", estimate) == stats
  assert len(calls) == 1
