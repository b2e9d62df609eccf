"""The shipped pre-training corpus and the deterministic id-hash split rule (no TensorFlow).

The corpus is a deduplicated subset of the 20,000 UniProt sequences of Debian's
`mmseqs2-examples` package, built by `scripts/make_corpus.py`; see
`ankh3_jax/assets/corpus/SOURCE.md` for its source, licence and counts.
"""
import hashlib
import os

from ankh3_jax.vocab import ASSETS_DIR

CORPUS_DIR = os.path.join(ASSETS_DIR, "corpus")
SPLITS = ("train", "validation", "test")
# Records per shipped split, as written by scripts/make_corpus.py (a test re-counts them).
NUM_RECORDS = {"train": 8000, "validation": 500, "test": 500}
# Fractions of the id-hash space given to the held-out splits when the corpus was built.
VALIDATION_FRACTION = 0.05
TEST_FRACTION = 0.05


def corpus_path(split: str) -> str:
  """Path of the shipped gzip FASTA file for `split` (train, validation or test)."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  return os.path.join(CORPUS_DIR, f"{split}.fasta.gz")


def clusters_path() -> str:
  """Path of the shipped corpus' cluster table: gzip TSV `id, representative, split`
  (the mmseqs2 cluster representative of each shipped record)."""
  return os.path.join(CORPUS_DIR, "clusters.tsv.gz")


def id_fraction(record_id: str) -> float:
  """Maps a record id to [0, 1) by SHA-256 (stable across runs and machines)."""
  digest = hashlib.sha256(record_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_for_id(record_id: str, validation_fraction: float = VALIDATION_FRACTION,
                 test_fraction: float = TEST_FRACTION) -> str:
  """Split of a record: validation if its id hashes below `validation_fraction`, test if
  below `validation_fraction + test_fraction`, else train."""
  if validation_fraction < 0 or test_fraction < 0 or (
      validation_fraction + test_fraction >= 1):
    raise ValueError("need fractions >= 0 with validation + test < 1, got "
                     f"{validation_fraction} and {test_fraction}")
  u = id_fraction(record_id)
  if u < validation_fraction:
    return "validation"
  if u < validation_fraction + test_fraction:
    return "test"
  return "train"
