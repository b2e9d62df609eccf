"""Streaming FASTA reader and atomic writer for protein sequences (no TensorFlow).

The reader takes plain or gzip files (told apart by their magic bytes, not their name),
multi-line records, LF, CRLF or old Mac CR line ends, a UTF-8 byte-order mark, blank
lines and blanks before a '>'; residues are upper-cased and whitespace inside sequence
lines is dropped. Anything else (UTF-16 text, for one) raises `FastaError`, whose message
names the file, the line, the record and the reason.
"""
import dataclasses
import gzip
import io
import os
import re
import zlib
from typing import BinaryIO, Callable, Iterable, Iterator, Optional, Tuple, Union

from ankh3_jax.output_paths import atomic_file
from ankh3_jax.vocab import RESIDUES

GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_LONE_CR = re.compile(b"\r(?!\n)")
_HEAD_BYTES = 1 << 16  # looked at for a byte-order mark and the line-end convention
# Longest header line accepted; sequence lines may be of any length (read in chunks).
MAX_HEADER_BYTES = 1 << 16
_CHUNK_BYTES = 1 << 20
_WHITESPACE = b" \t\r\n\v\f"
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")

PathLike = Union[str, os.PathLike]


class FastaError(ValueError):
  """A FASTA file is malformed; the message names file, line, record and reason."""

  def __init__(self, path: PathLike, reason: str, record_id: Optional[str] = None,
               line: Optional[int] = None):
    self.path = os.fspath(path)
    self.reason = reason
    self.record_id = record_id
    self.line = line
    where = self.path if line is None else f"{self.path}, line {line}"
    record = "" if record_id is None else f", record {record_id!r}"
    super().__init__(f"{where}{record}: {reason}")


def fasta_error_message(error: BaseException) -> Optional[str]:
  """The FastaError message inside `error`: itself, its causes, or a TensorFlow error
  that wraps one raised in a `from_generator` pipeline; None if there is none."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, FastaError):
      return str(error)
    for line in str(error).splitlines():
      if "FastaError: " in line:
        return line.split("FastaError: ", 1)[1].strip()
    error = error.__cause__ or error.__context__
  return None


@dataclasses.dataclass(frozen=True)
class FastaRecord:
  """One record: `id` is the first word of the header, `description` the rest."""
  id: str
  sequence: str
  description: str = ""


def _show_bytes(chars: Iterable[int]) -> str:
  """Names bytes for a message: printable ones quoted, others as escapes."""
  shown = []
  for c in sorted(set(chars)):
    shown.append(repr(chr(c)) if 32 <= c < 127 else f"'\\x{c:02x}'")
  return ", ".join(shown)


def _pieces(path: str, stream, compressed: bool) -> Iterator[Tuple[int, bytes, bool]]:
  """Yields (line number, piece of a line, piece continues the previous one)."""
  line, continued = 0, False
  while True:
    try:
      piece = stream.readline(_CHUNK_BYTES)
    except (OSError, EOFError, zlib.error) as e:
      kind = "gzip" if compressed else "file"
      raise FastaError(path, f"corrupt or truncated {kind} data ({e})",
                       line=line + 1) from e
    if not piece:
      return
    if not continued:
      line += 1
    yield line, piece, continued
    continued = not piece.endswith(b"\n")


class _Parser:
  """State machine over line pieces; one instance per file."""

  def __init__(self, path: str, alphabet: str, max_length: Optional[int],
               check_duplicates: bool):
    self.path = path
    allowed = (alphabet.upper() + alphabet.lower()).encode("ascii")
    self.allowed = allowed
    self.alphabet = alphabet
    self.illegal = re.compile(b"[^" + re.escape(allowed) + b"]")
    self.max_length = max_length
    self.seen = {} if check_duplicates else None
    self.record_id = None
    self.description = ""
    self.header_line = 0
    self.chunks = []
    self.length = 0

  def error(self, reason: str, line: Optional[int], record: bool = True) -> FastaError:
    return FastaError(self.path, reason, self.record_id if record else None, line)

  def start_record(self, header: bytes, line: int) -> None:
    """Parses a complete header line (without the '>')."""
    try:
      text = header.decode("utf-8")
    except UnicodeDecodeError:
      raise self.error("header is not UTF-8 text (binary data?)", line, record=False)
    if _CONTROL.search(text):
      raise self.error("header contains control characters (binary data?)", line,
                       record=False)
    words = text.strip().split(maxsplit=1)
    if not words:
      raise self.error("missing record id: empty header line '>'", line, record=False)
    self.record_id = words[0]
    self.description = words[1] if len(words) > 1 else ""
    self.header_line = line
    self.chunks, self.length = [], 0
    if self.seen is not None:
      if self.record_id in self.seen:
        raise self.error(
            f"duplicate record id (first seen on line {self.seen[self.record_id]})", line)
      self.seen[self.record_id] = line

  def add_sequence(self, data: bytes, line: int) -> None:
    """Appends one piece of sequence (whitespace already removed)."""
    bad = data.translate(None, self.allowed)
    if bad:
      position = self.length + self.illegal.search(data).start() + 1
      raise self.error(
          f"illegal character(s) {_show_bytes(bad)} in sequence, first at residue "
          f"{position} (allowed: {self.alphabet}, any case)", line)
    self.length += len(data)
    if self.max_length is not None and self.length > self.max_length:
      raise self.error(
          f"sequence longer than max_length={self.max_length} residues "
          f"(at least {self.length} read)", line)
    self.chunks.append(data)

  def finish_record(self) -> FastaRecord:
    if not self.length:
      raise self.error("empty sequence (header with no residues)", self.header_line)
    sequence = b"".join(self.chunks).decode("ascii").upper()
    self.chunks = []
    return FastaRecord(self.record_id, sequence, self.description)

  def parse(self, pieces: Iterable[Tuple[int, bytes, bool]]) -> Iterator[FastaRecord]:
    header = None  # bytearray while a header line is being read
    header_line = 0
    started = False
    for line, piece, continued in pieces:
      if header is not None:
        header += piece
        if len(header) > MAX_HEADER_BYTES:
          raise self.error(f"header line longer than {MAX_HEADER_BYTES} bytes",
                           header_line, record=False)
        if piece.endswith(b"\n"):
          self.start_record(bytes(header), header_line)
          header = None
        continue
      if not continued and piece.lstrip(b" \t").startswith(b">"):
        if started:
          yield self.finish_record()
        started = True
        header, header_line = bytearray(piece.lstrip(b" \t")[1:]), line
        if piece.endswith(b"\n"):
          self.start_record(bytes(header), header_line)
          header = None
        continue
      data = piece.translate(None, _WHITESPACE)
      if not data:
        continue
      if not started:
        raise self.error(_not_fasta_reason(data), line, record=False)
      self.add_sequence(data, line)
    if header is not None:
      self.start_record(bytes(header), header_line)
    if not started:
      raise self.error("empty file (no FASTA records)", None, record=False)
    yield self.finish_record()


def _not_fasta_reason(data: bytes) -> str:
  if _CONTROL.search(data.decode("latin-1")) or any(c >= 128 for c in data[:256]):
    return "not a FASTA file: binary data where a '>' header line was expected"
  return (f"not a FASTA file: expected a '>' header line first, found "
          f"{data[:20].decode('ascii', 'replace')!r}")


def read_fasta(path: PathLike, *, alphabet: str = RESIDUES,
               max_length: Optional[int] = None,
               check_duplicates: bool = False,
               opener: Optional[Callable[[str], BinaryIO]] = None) -> Iterator[FastaRecord]:
  """Streams the records of a FASTA file (plain or gzip), validating as it goes.

  Args:
    path: the file; gzip is detected from its first two bytes.
    alphabet: the allowed residue letters (either case); default `vocab.RESIDUES`.
    max_length: if set, a longer sequence raises (checked while reading, so an
      enormous record never sits in memory).
    check_duplicates: if True, a repeated record id raises.
    opener: opens `path` as a seekable binary stream with `readline(size)` (default:
      the built-in `open`; `sources` passes one over `tf.io.gfile` for gs:// paths).

  Yields:
    `FastaRecord`s with upper-case sequences.

  Raises:
    FastaError: the file is empty, not FASTA, or a record is malformed.
  """
  path = os.fspath(path)
  parser = _Parser(path, alphabet, max_length, check_duplicates)
  with (opener(path) if opener else open(path, "rb")) as raw:
    compressed = raw.read(2) == GZIP_MAGIC
    raw.seek(0)
    if compressed:
      with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
        yield from parser.parse(_pieces(path, _as_lines(path, stream, True), True))
    else:
      yield from parser.parse(_pieces(path, _as_lines(path, raw, False), False))


def _as_lines(path: str, stream, compressed: bool):
  """`stream` positioned after a UTF-8 byte-order mark, and read with universal line
  ends if the file uses lone CRs (old Mac); UTF-16 text raises `FastaError`."""
  try:
    head = stream.read(_HEAD_BYTES)
    stream.seek(0)
  except (OSError, EOFError, zlib.error) as e:
    kind = "gzip" if compressed else "file"
    raise FastaError(path, f"corrupt or truncated {kind} data ({e})", line=1) from e
  if head.startswith(_UTF16_BOMS):
    raise FastaError(path, f"UTF-16 text (byte-order mark {head[:2].hex(' ').upper()}): "
                     "save the file as UTF-8 or ASCII", line=1)
  if head.startswith(UTF8_BOM):
    stream.read(len(UTF8_BOM))
  if not _LONE_CR.search(head):
    return stream
  # latin-1 maps every byte to one character and back, so only the line ends change.
  return _EncodedLines(io.TextIOWrapper(stream, encoding="latin-1", newline=None))


class _EncodedLines:
  """`readline` of a latin-1 text stream, as bytes."""

  def __init__(self, text):
    self.text = text

  def readline(self, limit: int = -1) -> bytes:
    return self.text.readline(limit).encode("latin-1")


def _as_record(item) -> FastaRecord:
  if isinstance(item, FastaRecord):
    return item
  if len(item) == 2:
    return FastaRecord(item[0], item[1])
  return FastaRecord(item[0], item[2], item[1])  # (id, description, sequence)


def write_fasta(path: PathLike, records: Iterable, *, line_width: Optional[int] = 60,
                compress: Optional[bool] = None, alphabet: str = RESIDUES) -> int:
  """Writes records atomically (temporary file, then `os.replace`); returns the count.

  Args:
    path: destination; gzip-compressed if `compress`, or by default if it ends in .gz.
      Gzip output is byte-for-byte reproducible (no name or time in its header).
    records: `FastaRecord`s, `(id, sequence)` or `(id, description, sequence)` tuples.
    line_width: residues per line; None or 0 writes each sequence on one line.
    compress: force gzip on or off.
    alphabet: residues allowed in sequences (checked, so the output reads back).
  """
  path = os.fspath(path)
  if compress is None:
    compress = path.endswith(".gz")
  allowed = (alphabet.upper() + alphabet.lower()).encode("ascii")
  count = 0
  with atomic_file(path, "wb") as raw:
    out = (gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0)
           if compress else raw)
    for item in records:
      record = _as_record(item)
      if not record.id or any(c.isspace() for c in record.id):
        raise ValueError(f"record id must be one non-empty word, got {record.id!r}")
      sequence = record.sequence.encode("ascii", "replace")
      if not sequence or sequence.translate(None, allowed):
        raise ValueError(f"record {record.id!r}: empty sequence or residues outside "
                         f"{alphabet}")
      header = record.id + (f" {record.description}" if record.description else "")
      out.write(b">" + header.encode("utf-8") + b"\n")
      width = line_width or len(sequence)
      for start in range(0, len(sequence), width):
        out.write(sequence[start:start + width] + b"\n")
      count += 1
    if compress:
      out.close()
  return count
