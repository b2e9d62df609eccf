"""Reader of BLAST version 4 protein databases (`.pin` index, `.psq` residues, `.phr`
headers), e.g. Debian `metastudent-data`'s Swiss-Prot sets; numpy only.

`.pin` (integers big-endian unless noted): version (4), type (1 protein), title and
time stamp (each a 4-byte length and bytes), number of sequences N, total residues
(8 bytes, little-endian), longest length, then N + 1 header offsets into `.phr` and
N + 1 sequence offsets into `.psq`. `.psq` holds one NCBIstdaa byte per residue, a 0 byte
after each sequence. `.phr` holds ASN.1 (BER) `Blast-def-line-set`s; the id taken here is
the UniProt accession the first such string starts with (`oid<N>` if none does).
"""
import os
import re
import struct
from typing import Iterator

import numpy as np

from ankh3_jax.data import fasta

NCBISTDAA = "-ABCDEFGHIKLMNPQRSTVWXYZU*OJ"
_ACCESSION_START = re.compile(
    rb"([OPQ][0-9][A-Z0-9]{3}[0-9]|[A-NR-Z][0-9](?:[A-Z][A-Z0-9]{2}[0-9]){1,2})(?:[|\s]|$)")
_VISIBLE_STRING = 0x1A  # BER tag of an ASN.1 VisibleString


class BlastDbError(ValueError):
  """A file of a BLAST database is not what the format says."""


def _error(path: str, reason: str) -> BlastDbError:
  return BlastDbError(f"{path}: {reason}")


def read_index(prefix: str) -> dict:
  """The `.pin` fields: title, num_sequences, total_residues, max_length,
  header_offsets and sequence_offsets (int64 arrays of N + 1)."""
  path = prefix + ".pin"
  with open(path, "rb") as f:
    data = f.read()
  position = 0

  def take(size):
    nonlocal position
    if position + size > len(data):
      raise _error(path, f"truncated at byte {position} (file has {len(data)})")
    piece = data[position:position + size]
    position += size
    return piece

  version, kind = struct.unpack(">ii", take(8))
  if version != 4:
    raise _error(path, f"BLAST database version {version}, only version 4 is read")
  if kind != 1:
    raise _error(path, f"database type {kind} is not protein (1)")
  title = take(struct.unpack(">i", take(4))[0]).rstrip(b"\0").decode("latin-1")
  take(struct.unpack(">i", take(4))[0])  # time stamp
  num_sequences, = struct.unpack(">i", take(4))
  total_residues, = struct.unpack("<q", take(8))
  max_length, = struct.unpack(">i", take(4))
  if num_sequences < 0:
    raise _error(path, f"negative sequence count {num_sequences}")
  header_offsets = np.frombuffer(take(4 * (num_sequences + 1)), ">i4").astype(np.int64)
  sequence_offsets = np.frombuffer(take(4 * (num_sequences + 1)), ">i4").astype(np.int64)
  for name, offsets in (("header", header_offsets), ("sequence", sequence_offsets)):
    if np.any(np.diff(offsets) < 0):
      raise _error(path, f"{name} offsets decrease")
  return {"title": title, "num_sequences": num_sequences,
          "total_residues": total_residues, "max_length": max_length,
          "header_offsets": header_offsets, "sequence_offsets": sequence_offsets}


def header_id(header: bytes, oid: int) -> str:
  """The UniProt accession a BER header's first such VisibleString starts with (the
  title, `P69905|GO:0005344,...` in metastudent-data), else `oid<N>`."""
  position = 0
  while True:
    position = header.find(bytes([_VISIBLE_STRING]), position)
    if position < 0 or position + 2 > len(header):
      return f"oid{oid}"
    length, start = header[position + 1], position + 2
    if length & 0x80:  # long form: the next (length & 0x7f) bytes hold the length
      size = length & 0x7F
      length, start = int.from_bytes(header[start:start + size], "big"), start + size
    match = _ACCESSION_START.match(header[start:start + length])
    if match:
      return match.group(1).decode("ascii")
    position += 1


def read_blastdb(prefix: str) -> Iterator[fasta.FastaRecord]:
  """Yields the database's records in OID order (residue letters as in NCBIstdaa, so
  '*', '-', 'J' and 'O' may occur: filter against `vocab.RESIDUES`)."""
  index = read_index(prefix)
  psq_path, phr_path = prefix + ".psq", prefix + ".phr"
  residues = np.memmap(psq_path, np.uint8, mode="r") if os.path.getsize(psq_path) else (
      np.zeros(0, np.uint8))
  with open(phr_path, "rb") as f:
    headers = f.read()
  offsets, header_offsets = index["sequence_offsets"], index["header_offsets"]
  if len(offsets) and offsets[-1] > len(residues):
    raise _error(psq_path, f"index points to byte {offsets[-1]}, file has {len(residues)}")
  if len(header_offsets) and header_offsets[-1] > len(headers):
    raise _error(phr_path, f"index points to byte {header_offsets[-1]}, file has "
                 f"{len(headers)}")
  letters = np.frombuffer(NCBISTDAA.encode("ascii") + b"?" * (256 - len(NCBISTDAA)),
                          np.uint8)
  for oid in range(index["num_sequences"]):
    codes = np.asarray(residues[offsets[oid]:offsets[oid + 1]])
    if len(codes) and codes[-1] == 0:  # the separator after each sequence
      codes = codes[:-1]
    if len(codes) == 0 or codes.max() >= len(NCBISTDAA) or codes.min() == 0:
      raise _error(psq_path, f"sequence {oid} (bytes {offsets[oid]}-{offsets[oid + 1]}) "
                   "is empty or holds codes outside NCBIstdaa 1-27")
    record_id = header_id(headers[header_offsets[oid]:header_offsets[oid + 1]], oid)
    yield fasta.FastaRecord(record_id, letters[codes].tobytes().decode("ascii"))
