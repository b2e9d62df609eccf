"""BLAST v4 protein database reader, on a tiny database written here, and the Swiss-Prot
corpus script on top of it (needs mmseqs2)."""
import json
import os
import random
import shutil
import struct
import subprocess
import sys

import pytest

from ankh3_jax.data import blastdb
from ankh3_jax.data import fasta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEQUENCES = ["MKVLAY", "ACDEFGHIKLMNPQRSTVWY", "MXBZUO*"]
ACCESSIONS = ["P69905", "A0A023GPI8", None]


def _header(accession, long_title=False):
  """A Blast-def-line-set as metastudent-data writes it: the title (accession, then GO
  terms) and a local id string."""
  title = (accession or "unnamed protein").encode() + b"|GO:0005344,GO:0005833"
  if long_title:
    title += b",GO:0005344" * 10  # over 127 bytes: BER long-form length
  length = bytes([len(title)]) if len(title) < 128 else b"\x81" + bytes([len(title)])
  return (b"\x30\x80\x30\x80\xa0\x80\x1a" + length + title +
          b"\x00\x00\xa1\x80\x30\x80\xaa\x80\x30\x80\xa0\x80\x1a\x09BL_ORD_ID\x00\x00")


def _write_db(prefix, sequences=SEQUENCES, accessions=ACCESSIONS, version=4, kind=1,
              truncate_psq=False):
  psq, phr = bytearray(b"\x00"), bytearray()
  seq_offsets, hdr_offsets = [], []
  for sequence, accession in zip(sequences, accessions):
    seq_offsets.append(len(psq))
    hdr_offsets.append(len(phr))
    psq += bytes(blastdb.NCBISTDAA.index(c) for c in sequence) + b"\x00"
    phr += _header(accession, long_title=len(phr) > 0)
  seq_offsets.append(len(psq))
  hdr_offsets.append(len(phr))
  title, stamp = b"goasp.fasta", b"Jan 1, 2014  12:00 AM\x00\x00\x00"
  pin = struct.pack(">ii", version, kind)
  pin += struct.pack(">i", len(title)) + title + struct.pack(">i", len(stamp)) + stamp
  pin += struct.pack(">i", len(sequences)) + struct.pack("<q", sum(map(len, sequences)))
  pin += struct.pack(">i", max(map(len, sequences)))
  pin += struct.pack(f">{len(hdr_offsets)}i", *hdr_offsets)
  pin += struct.pack(f">{len(seq_offsets)}i", *seq_offsets)
  with open(prefix + ".pin", "wb") as f:
    f.write(pin)
  with open(prefix + ".psq", "wb") as f:
    f.write(bytes(psq[:-3] if truncate_psq else psq))
  with open(prefix + ".phr", "wb") as f:
    f.write(bytes(phr))
  return prefix


def test_reads_index_sequences_and_accessions(tmp_path):
  prefix = _write_db(str(tmp_path / "goasp.fasta"))
  index = blastdb.read_index(prefix)
  assert index["title"] == "goasp.fasta" and index["num_sequences"] == 3
  assert index["total_residues"] == 33 and index["max_length"] == 20
  records = list(blastdb.read_blastdb(prefix))
  assert [r.sequence for r in records] == SEQUENCES
  assert [r.id for r in records] == ["P69905", "A0A023GPI8", "oid2"]


@pytest.mark.parametrize("kwargs,reason", [
    ({"version": 5}, "version 5, only version 4"),
    ({"kind": 0}, "not protein"),
    ({"truncate_psq": True}, ".psq: index points to byte"),
])
def test_bad_database_names_file_and_reason(tmp_path, kwargs, reason):
  prefix = _write_db(str(tmp_path / "db"), **kwargs)
  with pytest.raises(blastdb.BlastDbError, match=reason) as info:
    list(blastdb.read_blastdb(prefix))
  assert str(tmp_path / "db") in str(info.value)


def test_truncated_index(tmp_path):
  prefix = _write_db(str(tmp_path / "db"))
  with open(prefix + ".pin", "r+b") as f:
    f.truncate(40)
  with pytest.raises(blastdb.BlastDbError, match=r"db\.pin: truncated"):
    blastdb.read_index(prefix)


@pytest.mark.skipif(shutil.which("mmseqs") is None, reason="mmseqs2 not installed")
def test_make_swissprot_corpus_end_to_end(tmp_path):
  rng = random.Random(0)
  families = ["".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(120))
              for _ in range(12)]
  sequences = [f[:j] + rng.choice("ACDEFGHIKLMNPQRSTVWY") + f[j + 1:]
               for f in families for j in (5, 50, 90)] + ["MKVLAY*"]  # one with a stop
  accessions = [f"P{i:05d}" for i in range(len(sequences))]
  prefix = _write_db(str(tmp_path / "sp"), sequences, accessions)
  out = tmp_path / "out"
  command = [sys.executable, os.path.join(REPO, "scripts", "make_swissprot_corpus.py"),
             "--db", prefix, "--out_dir", str(out), "--validation_fraction", "0.3",
             "--test_fraction", "0.3"]
  done = subprocess.run(command, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["records_read"] == 37 and summary["dropped_alphabet"] == 1
  assert summary["clusters"] == 12  # one per family
  split_of = {}
  for split in ("train", "validation", "test"):
    for record in fasta.read_fasta(str(out / f"{split}.fasta.gz")):
      split_of[record.id] = split
  assert sorted(split_of) == accessions[:36]
  for family in range(12):  # members of a family share a split
    assert len({split_of[accessions[3 * family + j]] for j in range(3)}) == 1
  again = subprocess.run(command, capture_output=True, text=True)
  assert again.returncode == 2 and "not overwriting" in again.stderr
