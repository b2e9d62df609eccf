"""Derives the shipped downstream set (secondary structure + CB coordinates) from ProMod3.

Run ONCE, at build time, with Debian's interpreter (the package is not on PyPI):

  apt-get install python3-promod3      # pulls promod3-data (~0.5 GB)
  /usr/bin/python3 scripts/make_downstream_data.py

Reads `/usr/share/promod3/loop_data/structure_db.dat` (21,119 PDB chains: sequence, 8-state
DSSP, backbone + CB coordinates) and writes `ankh3_jax/assets/downstream/structures.npz`:
  ids [n] bytes "PDBID_CHAIN", split [n] uint8 (0 train, 1 validation, 2 test),
  sequence [n] / dssp8 [n] bytes, offsets [n+1] int32 (residue offsets into cb),
  cb [residues, 3] int16: CB coordinates in 0.01 Angstrom, centred per chain.
Chains are contiguous stretches (ProMod3 keeps the longest connected stretch), 50-300
residues, standard amino acids only. Chains sharing >= 20% of their 5-mers with an already
chosen chain are skipped, so no two shipped chains (in or across splits) are near-identical.
Nothing here is needed at test time; the package only reads the npz.
"""
import argparse
import collections
import os
import random
import sys

import numpy as np

DB_PATH = "/usr/share/promod3/loop_data/structure_db.dat"
OUT = os.path.join(os.path.dirname(__file__), os.pardir, "ankh3_jax", "assets", "downstream",
                   "structures.npz")
STANDARD = set("ACDEFGHIKLMNPQRSTVWY")
DSSP8 = set("HGIEBTSC")
KMER = 5
MAX_SHARED = 0.2


def kmers(sequence):
  return {sequence[i:i + KMER] for i in range(len(sequence) - KMER + 1)}


def candidates(db, min_len, max_len):
  """(index, id, sequence, dssp) of chains passing the length and alphabet filters."""
  for i in range(db.GetNumCoords()):
    info = db.GetCoordInfo(i)
    if not min_len <= info.size <= max_len:
      continue
    seq, dssp = db.GetSequence(i), db.GetDSSPStates(i)
    if len(seq) != info.size or len(dssp) != info.size:
      continue
    if set(seq) - STANDARD or set(dssp) - DSSP8:
      continue
    yield i, f"{info.id}_{info.chain_name}", seq, dssp


def select(cands, count, seed):
  """Shuffles, then keeps chains not near-identical (5-mer overlap) to any kept one."""
  rng = random.Random(seed)
  cands = sorted(cands, key=lambda c: c[1])
  rng.shuffle(cands)
  index = collections.defaultdict(list)  # k-mer -> kept positions
  kept = []
  for cand in cands:
    own = kmers(cand[2])
    shared = collections.Counter(j for k in own for j in index.get(k, ()))
    if any(n >= MAX_SHARED * min(len(own), kept[j][1]) for j, n in shared.items()):
      continue
    for k in own:
      index[k].append(len(kept))
    kept.append((cand, len(own)))
    if len(kept) == count:
      break
  return [c for c, _ in kept]


def cb_coords(db, index):
  bb = db.GetBackboneList(index)
  xyz = np.array([[c for c in bb.GetCB(r)] for r in range(len(bb))], np.float64)
  if not np.isfinite(xyz).all():
    return None
  xyz -= xyz.mean(axis=0)
  scaled = np.round(xyz * 100.0)
  if np.abs(scaled).max() >= 32767:
    return None
  return scaled.astype(np.int16)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--db", default=DB_PATH)
  p.add_argument("--out", default=OUT)
  p.add_argument("--splits", default="1000,150,150", help="train,validation,test chains")
  p.add_argument("--min_len", type=int, default=50)
  p.add_argument("--max_len", type=int, default=300)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  from promod3 import loop  # pylint: disable=g-import-not-at-top

  db = loop.StructureDB.Load(args.db) if args.db != DB_PATH else loop.LoadStructureDB()
  sizes = [int(x) for x in args.splits.split(",")]
  chosen = select(list(candidates(db, args.min_len, args.max_len)), sum(sizes) + 50,
                  args.seed)
  ids, seqs, dssps, coords = [], [], [], []
  for index, cid, seq, dssp in chosen:
    xyz = cb_coords(db, index)
    if xyz is None:
      continue
    ids.append(cid)
    seqs.append(seq)
    dssps.append(dssp)
    coords.append(xyz)
    if len(ids) == sum(sizes):
      break
  if len(ids) < sum(sizes):
    sys.exit(f"only {len(ids)} chains passed the filters; asked for {sum(sizes)}")
  split = np.concatenate([np.full(n, s, np.uint8) for s, n in enumerate(sizes)])
  offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int32)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez_compressed(
      args.out, ids=np.array(ids, "S"), split=split, sequence=np.array(seqs, "S"),
      dssp8=np.array(dssps, "S"), offsets=offsets, cb=np.concatenate(coords))
  counts = collections.Counter("".join(dssps))
  print(f"wrote {os.path.normpath(args.out)}: {len(ids)} chains, {offsets[-1]} residues, "
        f"{os.path.getsize(args.out) / 1e6:.2f} MB; splits {sizes}; DSSP {dict(counts)}")


if __name__ == "__main__":
  main()
