"""Builds a larger, homology-split pre-training corpus from Debian's metastudent-data.

  apt-get install mmseqs2 metastudent-data          # 225 MB download, 782 MB installed
  python scripts/make_swissprot_corpus.py --out_dir /data/swissprot_corpus

Reads the Swiss-Prot (2014_01) BLAST v4 databases of the package (`blastdb`; the BPO, MFO
and CCO sets overlap, about 435,000 distinct sequences), keeps sequences over
`vocab.RESIDUES` once each (first in database order), clusters them with
`mmseqs easy-linclust` (linear time; same parameters as the shipped corpus: 30% identity,
80% coverage of both) and splits them as `scripts/make_corpus.py` does
(`cluster_splits.select_splits`: whole clusters by representative id hash, then held-out
records sharing >= 20% of their 5-mers with one training sequence dropped), keeping every
record. Writes `{train,validation,test}.fasta.gz`, `clusters.tsv.gz` and `summary.json`
to `--out_dir`, which must not already hold them. Not shipped (160 M residues, 99 MB).

A full run (32 min on 2 shared cores, 3 GB of memory): 1,338,325 records read, 435,059
distinct sequences, 122,971 clusters; 389,759 train / 14,575 validation / 15,055 test
records after the rule dropped 8,136 and 7,534 held-out candidates (linclust at 30%
identity misses many distant relatives; `--easy_cluster` finds more of them).
"""
import argparse
import itertools
import json
import os
from typing import Optional

import make_corpus  # pylint: disable=import-error  (run from scripts/)

from ankh3_jax.data import blastdb
from ankh3_jax.data import cluster_splits
from ankh3_jax.data import corpus
from ankh3_jax.data import fasta

DATASET = "/usr/share/metastudent-data/dataset_201401"
DEFAULT_PREFIXES = [os.path.join(DATASET, ontology, "goasp.fasta")
                    for ontology in ("BPO", "MFO", "CCO")]
OUTPUTS = [f"{split}.fasta.gz" for split in corpus.SPLITS] + ["clusters.tsv.gz",
                                                               "summary.json"]


def read_unique(prefixes: list, limit: Optional[int] = None) -> tuple:
  """([records], stats): sequences over `RESIDUES`, each once, ids made unique; at most
  `limit` records read (all if None)."""
  records = itertools.chain.from_iterable(blastdb.read_blastdb(p) for p in prefixes)
  stats = {}
  kept = cluster_splits.unique_records(itertools.islice(records, limit), stats,
                                       rename_repeated_ids=True)
  return kept, stats


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--db", action="append", help="BLAST database prefix (repeat); "
                      f"default: the BPO, MFO and CCO sets under {DATASET}")
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--easy_cluster", action="store_true", help="cluster with the "
                      "more sensitive `mmseqs easy-cluster` instead of easy-linclust "
                      "(slower; fewer held-out records for the 5-mer rule to drop)")
  parser.add_argument("--limit", type=int, help="read only the first LIMIT records (a "
                      "quick trial of the whole pipeline)")
  make_corpus.add_split_arguments(parser)
  args = parser.parse_args()

  existing = [name for name in OUTPUTS if os.path.exists(os.path.join(args.out_dir, name))]
  if existing:
    parser.error(f"{args.out_dir} already holds {', '.join(existing)}; not overwriting")
  prefixes = args.db or DEFAULT_PREFIXES
  records, stats = read_unique(prefixes, args.limit)
  counts = {split: None for split in corpus.SPLITS}
  by_split, representatives, selection = make_corpus.cluster_and_select(
      records, counts, args, linclust=not args.easy_cluster)
  os.makedirs(args.out_dir, exist_ok=True)
  summary = {"databases": prefixes, **stats, "records_clustered": len(records),
             **selection, "splits": {}}
  for split, split_records in by_split.items():
    out = os.path.join(args.out_dir, f"{split}.fasta.gz")
    fasta.write_fasta(out, split_records)
    summary["splits"][split] = make_corpus.split_summary(out, split_records)
  make_corpus.write_clusters(os.path.join(args.out_dir, "clusters.tsv.gz"), by_split,
                             representatives)
  with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  main()
