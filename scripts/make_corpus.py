"""Builds the shipped pre-training corpus from Debian's mmseqs2-examples DB.fasta.gz.

  apt-get download mmseqs2-examples && dpkg-deb -x mmseqs2-examples_*.deb pkg
  python scripts/make_corpus.py pkg/usr/share/doc/mmseqs2/example-data/DB.fasta.gz

Steps (deterministic: same input, same output bytes):
  1. read every record (any letters accepted at this stage);
  2. drop records with residues outside `vocab.RESIDUES`, then exact-duplicate sequences
     and repeated ids (the first occurrence in file order is kept);
  3. assign each record to a split by the SHA-256 of its id (`corpus.split_for_id`);
  4. keep, per split, the requested number of records with the lowest id hash (a uniform
     random subset), in that order;
  5. write `{train,validation,test}.fasta.gz` (id-only headers, 60 residues a line).
"""
import argparse
import hashlib
import json
import os
import string

from ankh3_jax.data import corpus
from ankh3_jax.data import fasta
from ankh3_jax.vocab import RESIDUES


def sha256_file(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def select(path: str, counts: dict, validation_fraction: float,
           test_fraction: float) -> tuple:
  """Returns ({split: [records]}, stats) following steps 1-4."""
  allowed = set(RESIDUES)
  stats = {"records_read": 0, "dropped_alphabet": 0, "dropped_duplicate_sequence": 0,
           "dropped_duplicate_id": 0}
  seen_sequences, seen_ids = set(), set()
  by_split = {split: [] for split in corpus.SPLITS}
  for record in fasta.read_fasta(path, alphabet=string.ascii_uppercase + "*-"):
    stats["records_read"] += 1
    if not set(record.sequence) <= allowed:
      stats["dropped_alphabet"] += 1
      continue
    if record.sequence in seen_sequences:
      stats["dropped_duplicate_sequence"] += 1
      continue
    if record.id in seen_ids:
      stats["dropped_duplicate_id"] += 1
      continue
    seen_sequences.add(record.sequence)
    seen_ids.add(record.id)
    split = corpus.split_for_id(record.id, validation_fraction, test_fraction)
    by_split[split].append(fasta.FastaRecord(record.id, record.sequence))
  for split, records in by_split.items():
    stats[f"available_{split}"] = len(records)
    records.sort(key=lambda r: (corpus.id_fraction(r.id), r.id))
    if len(records) < counts[split]:
      raise ValueError(f"only {len(records)} {split} records, {counts[split]} requested")
    del records[counts[split]:]
  return by_split, stats


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("db_fasta", help="path to mmseqs2-examples' DB.fasta.gz")
  parser.add_argument("--out_dir", default=corpus.CORPUS_DIR)
  for split in corpus.SPLITS:
    parser.add_argument(f"--{split}", type=int, default=corpus.NUM_RECORDS[split],
                        help=f"records in the {split} split")
  parser.add_argument("--validation_fraction", type=float,
                      default=corpus.VALIDATION_FRACTION)
  parser.add_argument("--test_fraction", type=float, default=corpus.TEST_FRACTION)
  args = parser.parse_args()

  counts = {split: getattr(args, split) for split in corpus.SPLITS}
  by_split, stats = select(args.db_fasta, counts, args.validation_fraction,
                           args.test_fraction)
  os.makedirs(args.out_dir, exist_ok=True)
  summary = {"input": os.path.basename(args.db_fasta),
             "input_sha256": sha256_file(args.db_fasta), **stats, "splits": {}}
  for split, records in by_split.items():
    out = os.path.join(args.out_dir, f"{split}.fasta.gz")
    fasta.write_fasta(out, records)
    lengths = sorted(len(r.sequence) for r in records)
    summary["splits"][split] = {
        "records": len(records), "residues": sum(lengths),
        "median_length": lengths[len(lengths) // 2], "max_length": lengths[-1],
        "bytes": os.path.getsize(out), "sha256": sha256_file(out)}
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  main()
