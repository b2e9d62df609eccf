"""Builds the shipped pre-training corpus from Debian's mmseqs2-examples DB.fasta.gz.

  apt-get install mmseqs2 mmseqs2-examples
  python scripts/make_corpus.py /usr/share/doc/mmseqs2/example-data/DB.fasta.gz

Steps (deterministic: same input and mmseqs2 version, same output bytes):
  1. read every record (any letters accepted at this stage);
  2. drop records with residues outside `vocab.RESIDUES`, then exact-duplicate sequences
     and repeated ids (the first occurrence in file order is kept);
  3. cluster the rest with `mmseqs easy-cluster` (30% identity, 80% coverage of both
     sequences; `cluster_splits.MmseqsParams`);
  4. send each cluster to the split of its representative's id hash (`corpus.split_for_id`);
     keep the `--train` training records with the lowest id hash; drop held-out records
     sharing >= 20% of their 5-mers with one kept training sequence (`homology`); keep per
     held-out split the requested number of remaining records with the lowest id hash;
  5. write `{train,validation,test}.fasta.gz` (id-only headers, 60 residues a line) and
     `clusters.tsv.gz` (record id, representative id, split) for the kept records.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import string
import tempfile

from ankh3_jax.data import cluster_splits
from ankh3_jax.data import corpus
from ankh3_jax.data import fasta


def sha256_file(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def read_clean(path: str) -> tuple:
  """([records], stats) after steps 1-2, in file order."""
  stats = {}
  records = cluster_splits.unique_records(
      fasta.read_fasta(path, alphabet=string.ascii_uppercase + "*-"), stats)
  return records, stats


def write_clusters(path: str, by_split: dict, representatives: dict) -> None:
  """`record id<TAB>representative id<TAB>split` per kept record, reproducible gzip."""
  text = io.StringIO()
  text.write("id\trepresentative\tsplit\n")
  for split, records in by_split.items():
    for record in records:
      text.write(f"{record.id}\t{representatives[record.id]}\t{split}\n")
  data = gzip.compress(text.getvalue().encode("ascii"), mtime=0)
  temporary = path + ".tmp"
  with open(temporary, "wb") as f:
    f.write(data)
  os.replace(temporary, path)


def split_summary(path: str, records: list) -> dict:
  lengths = sorted(len(r.sequence) for r in records) or [0]
  return {"records": len(records), "residues": sum(lengths),
          "median_length": lengths[len(lengths) // 2], "max_length": lengths[-1],
          "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
  """The clustering and split options shared with make_swissprot_corpus.py."""
  defaults = cluster_splits.MmseqsParams()
  parser.add_argument("--min_seq_id", type=float, default=defaults.min_seq_id)
  parser.add_argument("--coverage", type=float, default=defaults.coverage)
  parser.add_argument("--cov_mode", type=int, default=defaults.cov_mode)
  parser.add_argument("--sensitivity", type=float, default=defaults.sensitivity)
  parser.add_argument("--threads", type=int, default=defaults.threads)
  parser.add_argument("--validation_fraction", type=float,
                      default=corpus.VALIDATION_FRACTION)
  parser.add_argument("--test_fraction", type=float, default=corpus.TEST_FRACTION)
  parser.add_argument("--workdir", help="keep mmseqs2's files here (default: a "
                      "temporary directory, removed afterwards)")


def cluster_and_select(records: list, counts: dict, args, linclust: bool) -> tuple:
  """Steps 3-4: (by_split, representatives, summary of the clustering and selection)."""
  params = cluster_splits.MmseqsParams(
      min_seq_id=args.min_seq_id, coverage=args.coverage, cov_mode=args.cov_mode,
      sensitivity=args.sensitivity, linclust=linclust, threads=args.threads)
  sequences = [r.sequence for r in records]
  if args.workdir:
    representative = cluster_splits.run_mmseqs(sequences, args.workdir, params)
  else:
    with tempfile.TemporaryDirectory(prefix="ankh3_mmseqs_") as workdir:
      representative = cluster_splits.run_mmseqs(sequences, workdir, params)
  by_split, representatives, stats = cluster_splits.select_splits(
      records, representative, counts, args.validation_fraction, args.test_fraction)
  summary = {"mmseqs_version": cluster_splits.mmseqs_version(),
             "mmseqs_command": " ".join(["mmseqs", params.workflow, "IN", "OUT", "TMP",
                                         *params.command_args()]),
             **stats}
  return by_split, representatives, summary


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("db_fasta", help="path to mmseqs2-examples' DB.fasta.gz")
  parser.add_argument("--out_dir", default=corpus.CORPUS_DIR)
  for split in corpus.SPLITS:
    parser.add_argument(f"--{split}", type=int, default=corpus.NUM_RECORDS[split],
                        help=f"records in the {split} split")
  add_split_arguments(parser)
  args = parser.parse_args()

  counts = {split: getattr(args, split) for split in corpus.SPLITS}
  records, stats = read_clean(args.db_fasta)
  by_split, representatives, selection = cluster_and_select(records, counts, args,
                                                            linclust=False)
  os.makedirs(args.out_dir, exist_ok=True)
  summary = {"input": os.path.basename(args.db_fasta),
             "input_sha256": sha256_file(args.db_fasta), **stats,
             "records_clustered": len(records), **selection, "splits": {}}
  for split, split_records in by_split.items():
    out = os.path.join(args.out_dir, f"{split}.fasta.gz")
    fasta.write_fasta(out, split_records)
    summary["splits"][split] = split_summary(out, split_records)
  clusters_path = os.path.join(args.out_dir, "clusters.tsv.gz")
  write_clusters(clusters_path, by_split, representatives)
  summary["clusters_file"] = {"bytes": os.path.getsize(clusters_path),
                              "sha256": sha256_file(clusters_path)}
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  main()
