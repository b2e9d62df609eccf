"""FASTA reader/writer, the shipped corpus and the id-hash split (no TensorFlow)."""
import gzip
import os
import subprocess
import sys

import hypothesis
from hypothesis import strategies as st
import pytest

from ankh3_jax import vocab
from ankh3_jax.data import corpus
from ankh3_jax.data import fasta


def _write(path, data: bytes, compress=False):
  with open(path, "wb") as f:
    f.write(gzip.compress(data) if compress else data)
  return str(path)


def _read(path, **kwargs):
  return [(r.id, r.sequence) for r in fasta.read_fasta(path, **kwargs)]


def test_fasta_and_corpus_import_without_tensorflow():
  code = ("import sys, ankh3_jax.data.fasta, ankh3_jax.data.corpus; "
          "assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("compress", [False, True])
def test_multiline_crlf_lowercase_blank_lines(tmp_path, compress):
  data = (b"\r\n>sp|P1|ONE first protein\r\nMKV\r\nlay\r\n\r\n"
          b">two\r\nAC DE\r\nfg*"[:-1] + b"\r\n")
  path = _write(tmp_path / "x.txt", data, compress)  # format from magic bytes, not name
  records = list(fasta.read_fasta(path))
  assert [(r.id, r.sequence, r.description) for r in records] == [
      ("sp|P1|ONE", "MKVLAY", "first protein"), ("two", "ACDEFG", "")]


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("name, data", [
    ("utf8_bom", b"\xef\xbb\xbf>one first\nMKV\nLAY\n>two\nACDEFG\n"),
    ("old_mac_cr", b">one first\rMKV\rLAY\r\r>two\rACDEFG"),
    ("bom_and_cr", b"\xef\xbb\xbf>one first\rMKV\rLAY\r>two\rACDEFG\r"),
    ("blanks_before_header", b"  >one first\nMKV\nLAY\n\t>two\nACDEFG\n"),
    ("mixed_line_ends", b">one first\r\nMKV\rLAY\n>two\rACDEFG\r\n"),
])
def test_files_as_editors_save_them(tmp_path, compress, name, data):
  path = _write(tmp_path / f"{name}.fasta", data, compress)
  records = list(fasta.read_fasta(path))
  assert [(r.id, r.sequence, r.description) for r in records] == [
      ("one", "MKVLAY", "first"), ("two", "ACDEFG", "")]


@pytest.mark.parametrize("bom", [b"\xff\xfe", b"\xfe\xff"])
def test_utf16_text_is_named(tmp_path, bom):
  text = ">one\nMKV\n".encode("utf-16-le" if bom == b"\xff\xfe" else "utf-16-be")
  path = _write(tmp_path / "utf16.fasta", bom + text)
  with pytest.raises(fasta.FastaError, match=r"line 1: UTF-16 text \(byte-order mark "
                     r"(FF FE|FE FF)\): save the file as UTF-8 or ASCII"):
    list(fasta.read_fasta(path))


def test_gzip_named_plain_and_plain_named_gz(tmp_path):
  a = _write(tmp_path / "a.fasta", b">a\nMK\n", compress=True)
  b = _write(tmp_path / "b.fasta.gz", b">b\nMK\n")
  assert _read(a) == [("a", "MK")] and _read(b) == [("b", "MK")]


def test_no_trailing_newline_and_long_line(tmp_path, monkeypatch):
  monkeypatch.setattr(fasta, "_CHUNK_BYTES", 7)  # lines arrive in several pieces
  path = _write(tmp_path / "x.fa", b">id with a long description\n" + b"ACDEFGHIK" * 5)
  assert _read(path) == [("id", "ACDEFGHIK" * 5)]


def _case(name, data, reason, record=None, line=None, compress=False, **kwargs):
  return pytest.param(data, compress, kwargs, reason, record, line, id=name)


BAD = [
    _case("empty", b"", "empty file"),
    _case("blank", b"\n \r\n\t\n", "empty file"),
    _case("empty_gzip", b"", "empty file", compress=True),
    _case("no_header", b"MKVLAY\n>a\nMK\n", "expected a '>' header", line=1),
    _case("binary", b"\x00\x01\x02\xff\xfe garbage", "binary data", line=1),
    _case("binary_header", b">\x00\x01\x02\n", "control characters", line=1),
    _case("non_utf8_header", b">a\xff\xfe\nMK\n", "not UTF-8", line=1),
    _case("gzip_garbage", b"\x1f\x8b\x08\x00garbage that is not deflate", "corrupt",
          line=1),
    _case("empty_header", b">\nMKV\n", "empty header", line=1),
    _case("blank_header", b">a\nMK\n>   \r\nMKV\n", "empty header", line=3),
    _case("empty_sequence", b">a\n>b\nMK\n", "empty sequence", record="a", line=1),
    _case("empty_last", b">a\nMK\n\n>b\n\n", "empty sequence", record="b", line=4),
    _case("header_only", b">a", "empty sequence", record="a", line=1),
    _case("illegal", b">a\nMKV\nLA*Y1\n", "'*', '1'", record="a", line=3),
    _case("illegal_gz", b">a\nMK\n>b\nMK-V\n", "first at residue 3", record="b", line=4,
          compress=True),
    _case("digit", b">a\nMKV9\n", "illegal character(s) '9'", record="a", line=2),
    _case("nul_in_sequence", b">a\nMK\x00V\n", "'\\x00'", record="a", line=2),
    _case("too_long", b">a\nMK\n>b\n" + b"A" * 50 + b"\n" + b"A" * 60 + b"\n",
          "longer than max_length=100", record="b", line=5, max_length=100),
    _case("duplicate", b">a\nMK\n>b\nMK\n>a\nMV\n", "duplicate record id", record="a",
          line=5, check_duplicates=True),
]


@pytest.mark.parametrize("data,compress,kwargs,reason,record,line", BAD)
def test_bad_fasta_names_file_record_line_reason(tmp_path, data, compress, kwargs,
                                                  reason, record, line):
  path = _write(tmp_path / "bad.fasta", data, compress)
  with pytest.raises(fasta.FastaError) as info:
    list(fasta.read_fasta(path, **kwargs))
  error = info.value
  message = str(error)
  assert path in message and reason in message
  assert error.path == path and error.record_id == record and error.line == line
  if record is not None:
    assert f"record {record!r}" in message
  if line is not None:
    assert f"line {line}" in message


def test_truncated_gzip(tmp_path):
  blob = gzip.compress(b">a\n" + b"ACDEFGHIKLMNPQRSTVWY" * 2000 + b"\n")
  path = _write(tmp_path / "t.fasta.gz", blob[: len(blob) // 2])
  with pytest.raises(fasta.FastaError, match="corrupt or truncated gzip"):
    list(fasta.read_fasta(path))


def test_duplicates_allowed_by_default(tmp_path):
  path = _write(tmp_path / "d.fa", b">a\nMK\n>a\nMV\n")
  assert _read(path) == [("a", "MK"), ("a", "MV")]


def test_write_fasta_roundtrip_and_reproducible_gzip(tmp_path):
  records = [fasta.FastaRecord("a", "MKV" * 30, "desc here"), ("b", "acdef"),
             ("c", "some description", "W")]
  path = str(tmp_path / "out.fasta.gz")
  assert fasta.write_fasta(path, records, line_width=10) == 3
  first = open(path, "rb").read()
  assert first[:2] == fasta.GZIP_MAGIC
  assert [(r.id, r.sequence, r.description) for r in fasta.read_fasta(path)] == [
      ("a", "MKV" * 30, "desc here"), ("b", "ACDEF", ""), ("c", "W", "some description")]
  assert max(len(l) for l in gzip.decompress(first).splitlines()) <= 20
  fasta.write_fasta(path, records, line_width=10)
  assert open(path, "rb").read() == first  # byte-for-byte reproducible


def test_write_fasta_is_atomic(tmp_path):
  path = tmp_path / "keep.fasta"
  path.write_bytes(b">old\nMK\n")

  def records():
    yield ("new", "MKV")
    raise RuntimeError("generator failed midway")

  with pytest.raises(RuntimeError):
    fasta.write_fasta(path, records())
  with pytest.raises(ValueError, match="outside"):
    fasta.write_fasta(path, [("x", "MK1")])
  with pytest.raises(ValueError, match="one non-empty word"):
    fasta.write_fasta(path, [("two words", "MK")])
  assert path.read_bytes() == b">old\nMK\n"
  assert os.listdir(tmp_path) == ["keep.fasta"]  # no temporary file left behind


def test_split_for_id_is_deterministic_and_follows_fractions():
  ids = [f"UniRef50_{i}" for i in range(20000)]
  splits = [corpus.split_for_id(i, 0.1, 0.2) for i in ids]
  assert splits == [corpus.split_for_id(i, 0.1, 0.2) for i in ids]
  for name, fraction in [("validation", 0.1), ("test", 0.2), ("train", 0.7)]:
    share = splits.count(name) / len(ids)
    assert abs(share - fraction) < 4 * (fraction * (1 - fraction) / len(ids)) ** 0.5
  # Pinned values: the rule must not change between releases (it defines the splits).
  assert corpus.id_fraction("UniRef50_A0A000") == pytest.approx(
      int.from_bytes(__import__("hashlib").sha256(b"UniRef50_A0A000").digest()[:8],
                     "big") / 2**64)
  assert corpus.split_for_id("x", 0.0, 0.0) == "train"
  with pytest.raises(ValueError):
    corpus.split_for_id("x", 0.6, 0.5)


def test_shipped_corpus():
  seen = set()
  for split in corpus.SPLITS:
    records = list(fasta.read_fasta(corpus.corpus_path(split), check_duplicates=True))
    assert len(records) == corpus.NUM_RECORDS[split]
    for r in records:  # split membership (by cluster): tests/test_splits.py
      assert set(r.sequence) <= set(vocab.RESIDUES)
    sequences = {r.sequence for r in records}
    assert len(sequences) == len(records) and not sequences & seen
    seen |= sequences
  total = sum(os.path.getsize(corpus.corpus_path(s)) for s in corpus.SPLITS)
  assert total < 4_000_000
  with pytest.raises(ValueError):
    corpus.corpus_path("dev")


_fasta_like = st.lists(st.sampled_from(
    [b">", b">a", b" x", b"\n", b"\r\n", b"\r", b"MKV", b"acd", b" ", b"\t", b"\x00",
     b"*", b"1", b"\xff", b"\x1f\x8b", b"A" * 120]), max_size=40).map(b"".join)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.one_of(st.binary(max_size=300), _fasta_like), st.booleans())
def test_fuzz_random_bytes_raise_only_fasta_error(tmp_path_factory, data, compress):
  path = _write(tmp_path_factory.mktemp("fz") / "f", data, compress)
  try:
    for record in fasta.read_fasta(path, max_length=200, check_duplicates=True):
      assert record.sequence and set(record.sequence) <= set(vocab.RESIDUES)
      assert record.id and not any(c.isspace() for c in record.id)
  except fasta.FastaError as e:
    assert path in str(e)


_ids = st.text(st.characters(min_codepoint=33, max_codepoint=126,
                             blacklist_characters=">"), min_size=1, max_size=12)
_records = st.lists(st.tuples(_ids, st.text(vocab.RESIDUES + vocab.RESIDUES.lower(),
                                              min_size=1, max_size=150)),
                    min_size=1, max_size=8)


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(_records, st.sampled_from([None, 1, 7, 60]), st.booleans(),
                  st.booleans())
def test_fuzz_random_records_roundtrip(tmp_path_factory, records, width, compress, crlf):
  directory = tmp_path_factory.mktemp("rt")
  path = str(directory / "r.fasta")
  fasta.write_fasta(path, records, line_width=width, compress=compress)
  if crlf:
    raw = open(path, "rb").read()
    raw = gzip.decompress(raw) if compress else raw
    _write(path, raw.replace(b"\n", b"\r\n"), compress)
  assert _read(path) == [(i, s.upper()) for i, s in records]
