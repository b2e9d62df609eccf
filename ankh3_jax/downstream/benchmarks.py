"""Loaders for public benchmark files that users download themselves (none ship here).

* Secondary structure CSVs (CB513, TS115, CASP12 as distributed with NetSurfP-2.0 /
  ProtTrans): a sequence column (`input`, `sequence`, `seq` or `primary`) and a label
  column, 3-state (`dssp3`, `ss3`) and/or 8-state (`dssp8`, `ss8`). Labels are one
  letter per residue, optionally space-separated. An optional mask column (`mask_column`,
  e.g. `disorder` or `cb513_mask`) of 0/1 values per residue excludes its 0 residues.
* Fitness CSVs (FLIP GB1 `sequence,target,set,validation`; TAPE fluorescence exported as
  `primary,log_fluorescence[,split]`; ProteinGym DMS files `mutant,mutated_sequence,
  DMS_score,...`): a sequence column, a numeric target column and an optional split
  column (`set` or `split`); FLIP's `validation` column (True marks rows of the train set
  held out for validation) is honoured.
Any column can be named instead of recognised. Every problem raises `BenchmarkError`
naming the file, the line (1-based, header = line 1), the record and the reason.
"""
import csv
import dataclasses
import math
import os
from typing import Optional

from ankh3_jax.downstream.data import SS8_TO_SS3
from ankh3_jax.vocab import RESIDUES

SEQUENCE_COLUMNS = ("input", "sequence", "seq", "primary", "aa_seq", "mutated_sequence")
SS3_COLUMNS = ("dssp3", "ss3", "sst3", "q3")
SS8_COLUMNS = ("dssp8", "ss8", "sst8", "q8")
TARGET_COLUMNS = ("target", "label", "log_fluorescence", "fitness", "score", "stability_score",
                  "dms_score")
SPLIT_COLUMNS = ("set", "split")
ID_COLUMNS = ("id", "name", "pdb_id", "mutant")
VARIANT_COLUMNS = ("mutant", "mutated_sequence")  # ProteinGym: rows are variants
SS3_LETTERS = set("HEC")
SS8_LETTERS = set("HGIEBTSC") | {"L", "-"}


class BenchmarkError(ValueError):
  """A benchmark file is unusable; the message names file, row, record and reason."""

  def __init__(self, path: str, reason: str, line: Optional[int] = None,
               record: Optional[str] = None):
    where = path if line is None else f"{path}, line {line}"
    name = "" if record is None else f", record {record!r}"
    super().__init__(f"{where}{name}: {reason}")


@dataclasses.dataclass(frozen=True)
class SSRecord:
  id: str
  sequence: str
  ss3: Optional[str]      # per-residue H/E/C ('-' for masked residues)
  ss8: Optional[str]      # per-residue DSSP-8 with C for coil ('-' for masked residues)
  split: str = ""         # the split column's value ('' when the file has none)


@dataclasses.dataclass(frozen=True)
class FitnessRecord:
  id: str
  sequence: str
  target: float
  split: str              # 'train', 'validation', 'test' or '' when the file has none


def _rows(path: str):
  """(lower-case column names, line number, row) per data row; the line is the row's last."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise BenchmarkError(path, "file not found")
  with open(path, newline="", encoding="utf-8") as f:
    try:
      reader = csv.DictReader(f)
      fields = [c.strip().lower() for c in (reader.fieldnames or [])]
      if not fields:
        raise BenchmarkError(path, "empty file (no CSV header)")
      for row in reader:
        n = reader.line_num
        if None in row:
          raise BenchmarkError(path, "more values than header columns", n)
        yield fields, n, {k.strip().lower(): (v or "").strip() for k, v in row.items()}
    except UnicodeDecodeError as e:
      raise BenchmarkError(path, f"not UTF-8 text ({e})") from e
    except csv.Error as e:
      raise BenchmarkError(path, f"malformed CSV ({e})") from e


def _pick(path: str, fields: list, options: tuple, what: str, given: Optional[str],
          required: bool = True) -> Optional[str]:
  if given is not None:
    if given.lower() not in fields:
      raise BenchmarkError(path, f"no column {given!r} for {what}; columns are {fields}")
    return given.lower()
  for name in options:
    if name in fields:
      return name
  if required:
    raise BenchmarkError(path, f"no {what} column (looked for {list(options)}); "
                         f"columns are {fields}")
  return None


def columns_of(path: str) -> list:
  """The lower-case column names of a CSV file (its header)."""
  for fields, _, _ in _rows(path):
    return fields
  raise BenchmarkError(os.fspath(path), "no data rows")


def describes_variants(path: str) -> bool:
  """Whether the rows of a CSV are variants of one protein (ProteinGym's columns)."""
  return any(c in columns_of(path) for c in VARIANT_COLUMNS)


def _record_id(row: dict, id_column: Optional[str], line: int) -> str:
  return row[id_column] if id_column and row[id_column] else f"line{line}"


def _letters(text: str) -> str:
  """One letter per residue, whether or not the file separates them with spaces."""
  return text.replace(" ", "").upper()


def _check_sequence(path: str, row: int, rid: str, seq: str) -> str:
  if not seq:
    raise BenchmarkError(path, "empty sequence", row, rid)
  bad = sorted(set(seq) - set(RESIDUES))
  if bad:
    raise BenchmarkError(path, f"illegal residue(s) {bad} (allowed: {RESIDUES})", row, rid)
  return seq


def load_secondary_structure(path: str, *, sequence_column: Optional[str] = None,
                             ss3_column: Optional[str] = None,
                             ss8_column: Optional[str] = None,
                             mask_column: Optional[str] = None,
                             split_column: Optional[str] = None,
                             id_column: Optional[str] = None) -> list:
  """Reads a CB513/TS115/CASP12-style CSV into `SSRecord`s (8-state coil as 'C')."""
  records, seen = [], {}
  columns = None
  for fields, n, row in _rows(path):
    if columns is None:
      seq_c = _pick(path, fields, SEQUENCE_COLUMNS, "sequence", sequence_column)
      s3 = _pick(path, fields, SS3_COLUMNS, "3-state label", ss3_column, required=False)
      s8 = _pick(path, fields, SS8_COLUMNS, "8-state label", ss8_column, required=False)
      if s3 is None and s8 is None:
        raise BenchmarkError(path, f"no secondary-structure label column (looked for "
                             f"{list(SS3_COLUMNS + SS8_COLUMNS)}); columns are {fields}")
      mask_c = _pick(path, fields, (), "mask", mask_column) if mask_column else None
      split_c = _pick(path, fields, SPLIT_COLUMNS, "split", split_column, required=False)
      id_c = _pick(path, fields, ID_COLUMNS, "id", id_column, required=False)
      columns = (seq_c, s3, s8, mask_c, split_c, id_c)
    seq_c, s3, s8, mask_c, split_c, id_c = columns
    rid = _record_id(row, id_c, n)
    if rid in seen:
      raise BenchmarkError(path, f"duplicate id (first on line {seen[rid]})", n, rid)
    seen[rid] = n
    seq = _check_sequence(path, n, rid, _letters(row[seq_c]))
    mask = None
    if mask_c:
      values = row[mask_c].replace(",", " ").split()
      if len(values) == 1 and len(seq) > 1:
        values = list(values[0])
      if len(values) != len(seq):
        raise BenchmarkError(path, f"mask has {len(values)} values for {len(seq)} residues",
                             n, rid)
      try:
        mask = [float(v) != 0 for v in values]
      except ValueError as e:
        raise BenchmarkError(path, f"mask values must be numbers ({e})", n, rid) from e
    labels = {}
    for name, column, allowed in (("ss3", s3, SS3_LETTERS), ("ss8", s8, SS8_LETTERS)):
      if column is None:
        labels[name] = None
        continue
      text = _letters(row[column])
      if len(text) != len(seq):
        raise BenchmarkError(path, f"{column} has {len(text)} labels for {len(seq)} "
                             "residues", n, rid)
      bad = sorted(set(text) - allowed)
      if bad:
        raise BenchmarkError(path, f"{column} has unknown state(s) {bad} (allowed: "
                             f"{''.join(sorted(allowed))})", n, rid)
      if name == "ss8":
        text = "".join("C" if c in "L-" else c for c in text)
      if mask is not None:
        text = "".join(c if keep else "-" for c, keep in zip(text, mask))
      labels[name] = text
    if labels["ss3"] is None:  # derive 3-state from 8-state
      labels["ss3"] = "".join("-" if c == "-" else SS8_TO_SS3[c] for c in labels["ss8"])
    split = _split_of(path, n, rid, row, split_c)
    records.append(SSRecord(rid, seq, labels["ss3"], labels["ss8"], split))
  if not records:
    raise BenchmarkError(os.fspath(path), "no data rows")
  return records


def _split_of(path: str, line: int, rid: str, row: dict, split_column: Optional[str],
              held_out: str = "") -> str:
  """The row's split ('' when the file has no split column); an empty value is an error."""
  if not split_column:
    return ""
  if not row[split_column]:
    raise BenchmarkError(path, f"empty value in the split column {split_column!r}", line,
                         rid)
  return _split_name(row[split_column], held_out)


def _split_name(value: str, held_out: str) -> str:
  value = value.lower()
  if held_out.lower() in ("true", "1", "yes"):
    return "validation"
  return {"valid": "validation", "val": "validation", "dev": "validation"}.get(value, value)


def load_fitness(path: str, *, sequence_column: Optional[str] = None,
                 target_column: Optional[str] = None,
                 split_column: Optional[str] = None,
                 id_column: Optional[str] = None) -> list:
  """Reads a FLIP/TAPE/ProteinGym-style fitness CSV into `FitnessRecord`s."""
  records, seen = [], {}
  columns = None
  for fields, n, row in _rows(path):
    if columns is None:
      seq_c = _pick(path, fields, SEQUENCE_COLUMNS, "sequence", sequence_column)
      tgt_c = _pick(path, fields, TARGET_COLUMNS, "target", target_column)
      split_c = _pick(path, fields, SPLIT_COLUMNS, "split", split_column, required=False)
      valid_c = "validation" if "validation" in fields else None
      id_c = _pick(path, fields, ID_COLUMNS, "id", id_column, required=False)
      columns = (seq_c, tgt_c, split_c, valid_c, id_c)
    seq_c, tgt_c, split_c, valid_c, id_c = columns
    rid = _record_id(row, id_c, n)
    if rid in seen:
      raise BenchmarkError(path, f"duplicate id (first on line {seen[rid]})", n, rid)
    seen[rid] = n
    seq = _check_sequence(path, n, rid, row[seq_c].upper())
    try:
      target = float(row[tgt_c])
    except ValueError:
      raise BenchmarkError(path, f"target {row[tgt_c]!r} in column {tgt_c!r} is not a "
                           "number", n, rid) from None
    if not math.isfinite(target):
      raise BenchmarkError(path, f"target {row[tgt_c]!r} is not finite", n, rid)
    split = _split_of(path, n, rid, row, split_c, row[valid_c] if valid_c else "")
    records.append(FitnessRecord(rid, seq, target, split))
  if not records:
    raise BenchmarkError(os.fspath(path), "no data rows")
  return records
