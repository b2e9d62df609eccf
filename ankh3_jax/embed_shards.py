"""Output shards of multi-process embedding jobs, and `ankh3-embed merge`.

A job split N ways (`--num_shards N --shard_index i`, or one shard per process under
`jax.distributed`) gives shard i the records i, i + N, i + 2N, ... of the FASTA (input
order, so every shard sees the same length mix) and writes them to `OUT-0000i-of-0000N.h5`
(or `.npz`), with the usual resume. Each shard records its index, the shard count and its
record counts with the other settings. `merge` checks the shards form one job (all N
present and finished, the same settings and model fingerprint, every record exactly once,
and with the FASTA every record of it, unchanged) and writes one output, atomically, as a
single-process run would have.
"""
import argparse
import dataclasses
import glob
import json
import os
import re
from typing import Iterator, Optional, Sequence

import h5py
import numpy as np

from ankh3_jax import cli
from ankh3_jax import embedding_files
from ankh3_jax import output_paths
from ankh3_jax import quiet
from ankh3_jax.data import fasta

# Settings that differ between the shards of one job, and those only shards carry.
PROG = "ankh3-embed merge"
PER_SHARD_KEYS = ("shard_index", "shard_records")
SHARD_KEYS = ("num_shards", "fasta_records") + PER_SHARD_KEYS
_SHARD_NAME = re.compile(r"-(\d{5,})-of-(\d{5,})$")


@dataclasses.dataclass(frozen=True)
class Shard:
  """Shard `index` of `count`: which records it embeds and where it writes them."""
  index: int
  count: int

  def __post_init__(self):
    if self.count < 1 or not 0 <= self.index < self.count:
      raise ValueError(f"--shard_index must be in [0, --num_shards) and --num_shards >= 1, "
                       f"got shard {self.index} of {self.count}")

  def path(self, output: str) -> str:
    """`emb.h5` -> `emb-00001-of-00004.h5`."""
    root, ext = os.path.splitext(os.fspath(output))
    return f"{root}-{self.index:05d}-of-{self.count:05d}{ext}"

  def select(self, records: Sequence) -> list:
    """This shard's records: positions index, index + count, ... (deterministic)."""
    return list(records[self.index::self.count])

  def settings(self, fasta_records: int, shard_records: int) -> dict:
    return {"num_shards": self.count, "shard_index": self.index,
            "fasta_records": fasta_records, "shard_records": shard_records}


def shard_from_flags(num_shards: Optional[int], shard_index: Optional[int]) -> Optional[Shard]:
  """The shard of this process: from the flags, else one per `jax.distributed` process,
  else None (a single job)."""
  import jax  # pylint: disable=g-import-not-at-top

  if num_shards is None and shard_index is not None:
    raise ValueError("--shard_index needs --num_shards")
  if jax.distributed.is_initialized():
    if num_shards is not None and (num_shards, shard_index) != (
        jax.process_count(), jax.process_index()):
      raise ValueError(f"--num_shards/--shard_index ({num_shards}, {shard_index}) disagree "
                       f"with jax.distributed (process {jax.process_index()} of "
                       f"{jax.process_count()}); leave them out")
    return Shard(jax.process_index(), jax.process_count())
  if num_shards is None:
    return None
  if shard_index is None:
    raise ValueError("--num_shards needs --shard_index (this job's shard, from 0)")
  return Shard(shard_index, num_shards)


def find_shards(output: str) -> list:
  """The shard files of `output` (`emb.h5` -> `emb-*-of-*.h5`), in index order; raises
  ValueError unless they are exactly shards 0..N-1 of one N."""
  root, ext = os.path.splitext(os.fspath(output))
  found = {}
  for path in glob.glob(f"{glob.escape(root)}-*-of-*{ext}"):
    match = _SHARD_NAME.search(os.path.splitext(path)[0])
    if match and os.path.splitext(path)[0][:match.start()] == root:
      found[path] = (int(match.group(1)), int(match.group(2)))
  if not found:
    raise ValueError(f"no shards of {output} found ({root}-00000-of-0000N{ext}, ...)")
  counts = sorted({count for _, count in found.values()})
  if len(counts) > 1:
    raise ValueError(f"shards of {output} from jobs split {counts} ways are mixed; move "
                     "one set away")
  count = counts[0]
  by_index = {index: path for path, (index, _) in found.items()}
  missing = [i for i in range(count) if i not in by_index]
  if missing:
    partial = [i for i in missing
               if os.path.exists(Shard(i, count).path(output) + ".partial.h5")]
    note = f" (shards {partial} are unfinished .npz jobs)" if partial else ""
    raise ValueError(f"{output}: shard(s) {missing} of {count} are missing{note}; run "
                     f"their jobs (--num_shards {count} --shard_index i) first")
  return [by_index[i] for i in range(count)]


def _decode(value):
  if isinstance(value, bytes):
    return value.decode()
  return value.item() if isinstance(value, np.generic) else value


def read_contents(path: str) -> tuple:
  """(settings, {id: sequence sha1}) of one output file (.h5/.hdf5 or .npz)."""
  try:
    if path.endswith(".npz"):
      with np.load(path, allow_pickle=False) as z:
        settings = json.loads(str(z["__settings__"])) if "__settings__" in z.files else {}
        return settings, dict(zip(map(str, z["ids"]), map(str, z["sha1"])))
    with h5py.File(path, "r") as f:
      settings = {k: _decode(v) for k, v in f.attrs.items()}
      return settings, {_decode(ds.attrs["id"]): _decode(ds.attrs["sha1"])
                        for ds in f.get("per_protein", {}).values()}
  except (OSError, KeyError, ValueError) as e:
    raise ValueError(f"{path}: cannot read it as an ankh3-embed output ({e})") from e


def _iter_records(path: str) -> Iterator[tuple]:
  """(id, Embedding) of one output file, one record at a time for HDF5."""
  if path.endswith(".npz"):
    yield from embedding_files.read_embeddings(path).items()
    return
  with h5py.File(path, "r") as f:
    residues = f.get("per_residue", {})
    for name, ds in f.get("per_protein", {}).items():
      per_residue = residues[name][()] if name in residues else None
      yield _decode(ds.attrs["id"]), embedding_files.Embedding(per_residue, ds[()])


def check_shards(output: str, fasta_path: Optional[str] = None) -> tuple:
  """Checks the shards of `output` form one finished job; returns (shard paths, merged
  settings, [(id, sha1, shard path)] in FASTA order when given, else shard by shard)."""
  paths = find_shards(output)
  contents = [read_contents(p) for p in paths]
  first = {k: v for k, v in contents[0][0].items() if k not in PER_SHARD_KEYS}
  owner, order = {}, []
  for index, (path, (settings, hashes)) in enumerate(zip(paths, contents)):
    if settings.get("format") != embedding_files.FORMAT or "num_shards" not in settings:
      raise ValueError(f"{path}: not a shard of an ankh3-embed job (settings {settings})")
    if settings["shard_index"] != index or settings["num_shards"] != len(paths):
      raise ValueError(f"{path}: its settings say shard {settings['shard_index']} of "
                       f"{settings['num_shards']}, its name shard {index} of {len(paths)}; "
                       "was it renamed?")
    for key in sorted(set(first) | set(settings) - set(PER_SHARD_KEYS)):
      if settings.get(key) != first.get(key):
        what = "model fingerprint" if key == "model" else f"setting {key}"
        raise ValueError(f"{path}: {what} is {settings.get(key)!r}, but {paths[0]} has "
                         f"{first.get(key)!r}: the shards come from different jobs")
    if len(hashes) != settings["shard_records"]:
      raise ValueError(f"{path}: shard {index} holds {len(hashes)} of its "
                       f"{settings['shard_records']} records: it is unfinished; rerun its "
                       f"job (--num_shards {len(paths)} --shard_index {index}) to resume")
    for rid in sorted(hashes):
      if rid in owner:
        raise ValueError(f"record {rid!r} is in two shards: {owner[rid]} and {path}")
      owner[rid] = path
      order.append((rid, hashes[rid], path))
  if len(owner) != first["fasta_records"]:
    raise ValueError(f"{output}: the shards hold {len(owner)} records, the job's FASTA "
                     f"had {first['fasta_records']}")
  if fasta_path is not None:
    records = list(fasta.read_fasta(fasta_path, check_duplicates=True, max_length=None))
    by_id = {rid: (sha1, path) for rid, sha1, path in order}
    for record in records:
      if record.id not in by_id:
        raise ValueError(f"{fasta_path}: record {record.id!r} is in no shard of {output}")
      if by_id[record.id][0] != embedding_files.sequence_sha1(record.sequence):
        raise ValueError(f"{fasta_path}: record {record.id!r} differs from the sequence "
                         f"embedded in {by_id[record.id][1]}")
    extra = sorted(set(by_id) - {r.id for r in records})
    if extra:
      raise ValueError(f"{by_id[extra[0]][1]}: record {extra[0]!r} is not in {fasta_path} "
                       f"({len(extra)} such records)")
    order = [(r.id, by_id[r.id][0], by_id[r.id][1]) for r in records]
  return paths, {k: v for k, v in first.items() if k not in SHARD_KEYS}, order


def read_sharded(output: str, fasta_path: Optional[str] = None) -> dict:
  """All records of a sharded job as one dict id -> `Embedding` (shards checked first)."""
  paths, _, order = check_shards(output, fasta_path)
  stored = {}
  for path in paths:
    stored.update(_iter_records(path))
  return {rid: stored[rid] for rid, _, _ in order}


def merge(output: str, fasta_path: Optional[str] = None, overwrite: bool = False) -> dict:
  """Joins the shards of `output` into `output` (same format), written atomically; the
  shards are left in place. Returns {"records", "shards", "output"}."""
  paths, settings, order = check_shards(output, fasta_path)
  output_paths.check_output_file(output, [*paths, fasta_path], overwrite=overwrite,
                                 what="merged output")
  hashes = {rid: sha1 for rid, sha1, _ in order}
  with output_paths.OutputLock(output, "ankh3-embed merge"):
    if output.endswith(".npz"):
      arrays = {"ids": np.array([rid for rid, _, _ in order]),
                "sha1": np.array([sha1 for _, sha1, _ in order]),
                "__settings__": np.array(json.dumps(settings))}
      for path in paths:
        for rid, emb in _iter_records(path):
          if emb.per_residue is not None:
            arrays[f"per_residue/{rid}"] = emb.per_residue
          arrays[f"per_protein/{rid}"] = emb.per_protein
      with output_paths.atomic_file(output, "wb") as f:
        np.savez(f, **arrays)
    else:
      with output_paths.atomic_file(output, "w+b") as f:
        store = embedding_files.H5Store(f, settings)
        try:
          for path in paths:
            for rid, emb in _iter_records(path):
              store.write(rid, hashes[rid], emb, str(emb.per_protein.dtype))
        finally:
          store.close()
  return {"records": len(order), "shards": len(paths), "output": output}


def merge_main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(
      prog=PROG, description="Check the shards OUT-0000i-of-0000N of a split "
      "ankh3-embed job and join them into OUT.")
  p.add_argument("--output", required=True, help="the --output the shard jobs were given")
  p.add_argument("--fasta", default=None, help="the jobs' FASTA: also check every record "
                 "of it is present, with the same sequence")
  p.add_argument("--check_only", action="store_true", help="check, write nothing")
  p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
  quiet.add_flag(p)
  args = p.parse_args(argv)
  try:
    if args.check_only:
      paths, _, order = check_shards(args.output, args.fasta)
      print(f"{PROG}: {len(paths)} shards, {len(order)} records, all present "
            "once, one model and settings")
      return 0
    summary = merge(args.output, args.fasta, args.overwrite)
  except (fasta.FastaError, ValueError, OSError) as e:
    return cli.error(PROG, cli.one_line(e))
  print(f"{PROG}: {summary['records']} records from {summary['shards']} shards "
        f"-> {summary['output']}")
  return 0
