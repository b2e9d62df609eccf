"""Homology-aware train / validation / test splits: clusters (mmseqs2) to splits, then the
k-mer rule of `homology` on what is held out (no TensorFlow).

Build-time code shared by `scripts/make_corpus.py` and `scripts/make_swissprot_corpus.py`:

  representative = run_mmseqs(sequences, workdir, MmseqsParams())   # needs `mmseqs`
  by_split, representatives, stats = select_splits(records, representative, counts)

Whole clusters go to one split, by SHA-256 of the representative's id
(`corpus.split_for_id`); held-out records that still share >= 20% of their 5-mers with one
kept training sequence are dropped.
"""
import dataclasses
import os
import shutil
import subprocess
from typing import Iterable, Mapping, Optional, Sequence

from ankh3_jax.data import corpus
from ankh3_jax.data import fasta
from ankh3_jax.data import homology
from ankh3_jax.vocab import RESIDUES


@dataclasses.dataclass(frozen=True)
class MmseqsParams:
  """mmseqs2 clustering parameters (the defaults are the shipped corpus')."""
  min_seq_id: float = 0.3
  coverage: float = 0.8
  cov_mode: int = 0  # 0: the alignment covers `coverage` of both sequences
  sensitivity: float = 4.0  # easy-cluster only
  linclust: bool = False  # easy-linclust (linear time, for large inputs)
  threads: int = 2

  def command_args(self) -> list:
    args = ["--min-seq-id", str(self.min_seq_id), "-c", str(self.coverage),
            "--cov-mode", str(self.cov_mode), "--threads", str(self.threads), "-v", "1"]
    if not self.linclust:
      args += ["-s", str(self.sensitivity)]
    return args

  @property
  def workflow(self) -> str:
    return "easy-linclust" if self.linclust else "easy-cluster"


def unique_records(records: Iterable[fasta.FastaRecord], stats: dict,
                   rename_repeated_ids: bool = False) -> list:
  """Records over `RESIDUES`, each sequence once (the first in order kept); a repeated
  id is dropped, or renamed `<id>_2`, `<id>_3`, ... with `rename_repeated_ids`. Counts
  go to `stats` (records_read, dropped_alphabet, dropped_duplicate_sequence,
  dropped_duplicate_id)."""
  allowed = set(RESIDUES)
  for key in ("records_read", "dropped_alphabet", "dropped_duplicate_sequence",
              "dropped_duplicate_id"):
    stats.setdefault(key, 0)
  seen_sequences, id_uses, kept = set(), {}, []
  for record in records:
    stats["records_read"] += 1
    if not set(record.sequence) <= allowed:
      stats["dropped_alphabet"] += 1
      continue
    if record.sequence in seen_sequences:
      stats["dropped_duplicate_sequence"] += 1
      continue
    uses = id_uses.get(record.id, 0)
    if uses and not rename_repeated_ids:
      stats["dropped_duplicate_id"] += 1
      continue
    seen_sequences.add(record.sequence)
    id_uses[record.id] = uses + 1
    record_id = record.id if uses == 0 else f"{record.id}_{uses + 1}"
    kept.append(fasta.FastaRecord(record_id, record.sequence))
  return kept


def mmseqs_binary() -> str:
  path = shutil.which("mmseqs")
  if path is None:
    raise FileNotFoundError("mmseqs not found on PATH (Debian: apt-get install mmseqs2)")
  return path


def mmseqs_version() -> str:
  return subprocess.run([mmseqs_binary(), "version"], check=True, capture_output=True,
                        text=True).stdout.strip()


def read_cluster_tsv(path: str, num_sequences: int) -> list:
  """Representative index of each sequence from mmseqs' `<prefix>_cluster.tsv`, whose
  lines are `representative<TAB>member` with the sequence indices as names."""
  representative = [-1] * num_sequences
  with open(path, encoding="ascii") as f:
    for line_number, line in enumerate(f, 1):
      fields = line.rstrip("\n").split("\t")
      try:
        rep, member = (int(x) for x in fields)
        if not (0 <= rep < num_sequences and 0 <= member < num_sequences):
          raise ValueError
      except ValueError:
        raise ValueError(f"{path}, line {line_number}: expected two sequence indices "
                         f"below {num_sequences}, got {line.rstrip()!r}") from None
      if representative[member] != -1:
        raise ValueError(f"{path}, line {line_number}: sequence {member} is in two "
                         "clusters")
      representative[member] = rep
  missing = [i for i, rep in enumerate(representative) if rep == -1]
  if missing:
    raise ValueError(f"{path}: {len(missing)} sequences in no cluster, first {missing[0]}")
  for i, rep in enumerate(representative):
    if representative[rep] != rep:
      raise ValueError(f"{path}: representative {rep} of sequence {i} is not its own "
                       "representative")
  return representative


def run_mmseqs(sequences: Sequence[str], workdir: str,
               params: MmseqsParams = MmseqsParams()) -> list:
  """Clusters `sequences` with mmseqs2 in `workdir` (created; its contents are scratch);
  returns the representative's index for each sequence."""
  os.makedirs(workdir, exist_ok=True)
  query = os.path.join(workdir, "input.fasta")
  # Indices as names: mmseqs would shorten UniProt headers to their accession.
  fasta.write_fasta(query, ((str(i), s) for i, s in enumerate(sequences)), line_width=None,
                    compress=False)
  prefix = os.path.join(workdir, "clusters")
  subprocess.run([mmseqs_binary(), params.workflow, query, prefix,
                  os.path.join(workdir, "tmp"), *params.command_args()], check=True)
  return read_cluster_tsv(prefix + "_cluster.tsv", len(sequences))


def _hash_order(indices, records) -> list:
  return sorted(indices, key=lambda i: (corpus.id_fraction(records[i].id), records[i].id))


def select_splits(records: Sequence[fasta.FastaRecord], representative: Sequence[int],
                  counts: Optional[Mapping[str, Optional[int]]] = None,
                  validation_fraction: float = corpus.VALIDATION_FRACTION,
                  test_fraction: float = corpus.TEST_FRACTION, k: int = homology.KMER,
                  max_shared: float = homology.MAX_SHARED_FRACTION) -> tuple:
  """({split: [records]}, {record id: representative's id} of the kept records, stats).

  1. Each cluster goes to the split of its representative's id (`corpus.split_for_id`).
  2. Train keeps its `counts["train"]` records with the lowest id hash (all if None).
  3. Held-out records sharing >= `max_shared` of their distinct k-mers with one kept
     training sequence are dropped; each held-out split keeps its `counts[split]`
     remaining records with the lowest id hash (all if None).
  Records come out in id-hash order. Raises ValueError if a split has too few records.
  """
  if len(representative) != len(records):
    raise ValueError(f"{len(representative)} representatives for {len(records)} records")
  counts = dict(counts or {})
  cluster_split = {}
  members = {split: [] for split in corpus.SPLITS}
  for i, rep in enumerate(representative):
    if rep not in cluster_split:
      cluster_split[rep] = corpus.split_for_id(records[rep].id, validation_fraction,
                                               test_fraction)
    members[cluster_split[rep]].append(i)
  stats = {"clusters": len(cluster_split)}
  for split in corpus.SPLITS:
    stats[f"clusters_{split}"] = sum(s == split for s in cluster_split.values())
    stats[f"available_{split}"] = len(members[split])

  def take(split, ordered):
    wanted = counts.get(split)
    if wanted is None:
      return ordered
    if len(ordered) < wanted:
      raise ValueError(f"only {len(ordered)} {split} records, {wanted} requested")
    return ordered[:wanted]

  chosen = {"train": take("train", _hash_order(members["train"], records))}
  train_seqs = [records[i].sequence for i in chosen["train"]]
  for split in corpus.SPLITS[1:]:
    ordered = _hash_order(members[split], records)
    fractions = homology.max_shared_kmer_fraction(
        [records[i].sequence for i in ordered], train_seqs, k)
    homologous = fractions >= max_shared
    wanted = counts.get(split)
    stats[f"homologous_{split}"] = int(homologous.sum())
    # Of the records the split would have kept without the rule, how many it replaced.
    stats[f"replaced_{split}"] = int(homologous[:wanted].sum())
    chosen[split] = take(split, [i for i, h in zip(ordered, homologous) if not h])
  by_split = {split: [records[i] for i in chosen[split]] for split in corpus.SPLITS}
  representatives = {records[i].id: records[representative[i]].id
                     for indices in chosen.values() for i in indices}
  return by_split, representatives, stats
