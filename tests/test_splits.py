"""Homology-aware splits: the k-mer checker, cluster-to-split selection, and the rule on
every shipped split (pre-training corpus and downstream structures); no mmseqs2 needed."""
import gzip
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ankh3_jax.data import cluster_splits
from ankh3_jax.data import corpus
from ankh3_jax.data import fasta
from ankh3_jax.data import homology
from ankh3_jax.downstream import data as downstream_data

RESIDUES20 = "ACDEFGHIKLMNPQRSTVWY"


def test_split_modules_import_without_tensorflow():
  code = ("import sys; from ankh3_jax.data import homology, cluster_splits, blastdb; "
          "assert 'tensorflow' not in sys.modules and 'jax' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)


def _random_sequence(rng, length):
  return "".join(rng.choice(RESIDUES20) for _ in range(length))


def _brute_force(heldout, train, k):
  def kmers(s):
    return {s[i:i + k] for i in range(len(s) - k + 1)}

  out = []
  for h in heldout:
    own = kmers(h)
    out.append(max((len(own & kmers(t)) / len(own) for t in train), default=0.0)
               if own else 0.0)
  return np.array(out)


def test_checker_flags_a_shared_stretch_and_not_an_unrelated_sequence():
  rng = random.Random(0)
  heldout = _random_sequence(rng, 104)  # 100 distinct 5-mers (checked below)
  # 30 residues of it (26 5-mers) inside an otherwise unrelated training sequence.
  related = _random_sequence(rng, 50) + heldout[40:70] + _random_sequence(rng, 50)
  unrelated = _random_sequence(rng, 300)
  owners, codes = homology.distinct_kmers([heldout])
  assert len(codes) == 100 and (owners == 0).all()
  fractions, nearest = homology.nearest_training_sequence(
      [heldout, unrelated[:120]], [unrelated, related])
  assert fractions[0] == pytest.approx(0.26) and nearest[0] == 1
  assert fractions[1] == 1.0 and nearest[1] == 0  # a piece of a training sequence
  assert homology.is_homologous([heldout], [related]).tolist() == [True]
  assert homology.is_homologous([heldout], [unrelated]).tolist() == [False]
  # 15 shared 5-mers split over two training sequences: each holds < 20%, not flagged.
  halves = [_random_sequence(rng, 40) + heldout[10:29], heldout[50:69] +
            _random_sequence(rng, 40)]
  assert homology.max_shared_kmer_fraction([heldout], halves) == pytest.approx([0.15])
  assert homology.is_homologous([heldout], halves).tolist() == [False]


def test_checker_counts_distinct_kmers_of_the_heldout_sequence():
  # "AAAAAAAAAC" has 2 distinct 5-mers (AAAAA, AAAAC); the training sequence holds one.
  assert homology.max_shared_kmer_fraction(["AAAAAAAAAC"], ["AAAAAAA"]
                                           ).tolist() == [0.5]
  # Lower case is the same residue; sequences shorter than k share nothing.
  fractions, nearest = homology.nearest_training_sequence(["mkvla", "MKV", "WWWWW"],
                                                          ["XXMKVLAXX"])
  assert fractions.tolist() == [1.0, 0.0, 0.0] and nearest.tolist() == [0, -1, -1]
  assert homology.max_shared_kmer_fraction([], ["MKVLA"]).shape == (0,)
  assert homology.max_shared_kmer_fraction(["MKVLA"], []).tolist() == [0.0]
  with pytest.raises(ValueError, match="k must be"):
    homology.max_shared_kmer_fraction(["MKVLA"], ["MKVLA"], k=9)


@pytest.mark.parametrize("k", [3, 5])
def test_checker_matches_brute_force_and_chunking(k):
  rng = random.Random(k)
  train = [_random_sequence(rng, rng.randint(1, 80)) for _ in range(60)]
  heldout = [_random_sequence(rng, rng.randint(1, 60)) for _ in range(20)]
  # Some held-out sequences made of training pieces, so there are large overlaps.
  heldout += [train[i][5:40] + _random_sequence(rng, 10) + train[i + 1][:30]
              for i in range(0, 20, 2)]
  expected = _brute_force(heldout, train, k)
  assert (expected > 0.2).sum() >= 10
  for chunk in (1, 100, 10**6):
    got = homology.max_shared_kmer_fraction(heldout, train, k, chunk_residues=chunk)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def _records(n, rng):
  return [fasta.FastaRecord(f"r{i}", _random_sequence(rng, 60)) for i in range(n)]


def test_select_splits_keeps_clusters_whole_and_drops_homologous_heldout():
  rng = random.Random(1)
  records = _records(400, rng)
  representative = [i - i % 4 for i in range(400)]  # clusters of 4 consecutive records
  # A held-out record that copies a training one although mmseqs put them apart.
  splits = {i: corpus.split_for_id(records[i].id, 0.1, 0.1) for i in range(0, 400, 4)}
  heldout_rep = next(i for i, s in splits.items() if s == "validation")
  train_rep = next(i for i, s in splits.items() if s == "train")
  records[heldout_rep + 1] = fasta.FastaRecord(records[heldout_rep + 1].id,
                                               records[train_rep].sequence[:40] + "W" * 5)
  by_split, representatives, stats = cluster_splits.select_splits(
      records, representative, {"train": None, "validation": None, "test": None}, 0.1, 0.1)
  index = {r.id: i for i, r in enumerate(records)}
  for split, kept in by_split.items():
    for record in kept:
      rep_id = representatives[record.id]
      assert rep_id == records[representative[index[record.id]]].id
      assert corpus.split_for_id(rep_id, 0.1, 0.1) == split
    assert [corpus.id_fraction(r.id) for r in kept] == sorted(
        corpus.id_fraction(r.id) for r in kept)
  assert records[heldout_rep + 1] not in by_split["validation"]
  assert stats["homologous_validation"] == 1 and stats["homologous_test"] == 0
  assert stats["clusters"] == 100
  assert sum(len(v) for v in by_split.values()) == 399
  assert stats["available_validation"] == len(by_split["validation"]) + 1
  # Counts: the lowest id hashes are kept; too many requested is an error.
  few, _, _ = cluster_splits.select_splits(records, representative,
                                           {"train": 10, "validation": 3, "test": 3},
                                           0.1, 0.1)
  assert [len(few[s]) for s in corpus.SPLITS] == [10, 3, 3]
  assert few["train"] == by_split["train"][:10]
  with pytest.raises(ValueError, match="only .* test records, 1000 requested"):
    cluster_splits.select_splits(records, representative, {"test": 1000}, 0.1, 0.1)


def test_read_cluster_tsv(tmp_path):
  path = tmp_path / "c_cluster.tsv"
  path.write_text("0\t0\n0\t2\n1\t1\n")
  assert cluster_splits.read_cluster_tsv(str(path), 3) == [0, 1, 0]
  for text, reason in [("0\t0\n0\tx\n", "line 2: expected two sequence indices"),
                       ("0\t0\n", "2 sequences in no cluster"),
                       ("0\t0\n0\t1\n1\t1\n", "line 3: sequence 1 is in two clusters"),
                       ("1\t0\n2\t1\n2\t2\n", "representative 1 of sequence 0")]:
    path.write_text(text)
    with pytest.raises(ValueError, match=reason) as info:
      cluster_splits.read_cluster_tsv(str(path), 3)
    assert str(path) in str(info.value)


@pytest.mark.skipif(shutil.which("mmseqs") is None, reason="mmseqs2 not installed")
def test_run_mmseqs_clusters_homologs_together(tmp_path):
  rng = random.Random(2)
  family = _random_sequence(rng, 200)
  mutant = "".join(c if rng.random() > 0.1 else rng.choice(RESIDUES20) for c in family)
  other = _random_sequence(rng, 200)
  # easy-linclust: easy-cluster's prefilter costs ~15 s of CPU even on 3 sequences.
  representative = cluster_splits.run_mmseqs(
      [family, other, mutant], str(tmp_path), cluster_splits.MmseqsParams(linclust=True))
  assert representative[0] == representative[2] != representative[1]


def _read_split(split):
  return [r.sequence for r in fasta.read_fasta(corpus.corpus_path(split))]


def test_shipped_corpus_heldout_shares_few_kmers_with_train():
  heldout = {split: _read_split(split) for split in ("validation", "test")}
  fractions = homology.max_shared_kmer_fraction(
      heldout["validation"] + heldout["test"], _read_split("train"))  # one pass
  assert len(fractions) == corpus.NUM_RECORDS["validation"] + corpus.NUM_RECORDS["test"]
  worst = int(np.argmax(fractions))
  assert fractions[worst] < homology.MAX_SHARED_FRACTION, (
      f"held-out record {worst} (validation, then test) shares {fractions[worst]:.0%} of "
      "its 5-mers with one training sequence")


def test_shipped_corpus_clusters_file_matches_the_splits():
  with gzip.open(corpus.clusters_path(), "rt", encoding="ascii") as f:
    header, *rows = [line.rstrip("\n").split("\t") for line in f]
  assert header == ["id", "representative", "split"]
  listed = {record_id: (rep, split) for record_id, rep, split in rows}
  assert len(listed) == len(rows) == sum(corpus.NUM_RECORDS.values())
  split_of_cluster = {}
  for split in corpus.SPLITS:
    for record in fasta.read_fasta(corpus.corpus_path(split)):
      rep, listed_split = listed.pop(record.id)
      assert listed_split == split == corpus.split_for_id(rep)
      assert split_of_cluster.setdefault(rep, split) == split  # clusters stay whole
  assert not listed


def test_shipped_downstream_heldout_shares_few_kmers_with_train():
  train = [c.sequence for c in downstream_data.load_chains("train")]
  assert len(train) == 1000
  for split in ("validation", "test"):
    heldout = [c.sequence for c in downstream_data.load_chains(split)]
    fractions = homology.max_shared_kmer_fraction(heldout, train)
    assert len(fractions) == 150 and fractions.max() < homology.MAX_SHARED_FRACTION
