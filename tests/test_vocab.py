"""The shipped protein vocabulary: ids, case, unknown letters, sentinels, rebuild."""
import importlib.util
import os

import pytest
import sentencepiece as spm

from ankh3_jax import vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_id_per_residue_and_specials():
  sp = vocab.get_processor()
  assert sp.get_piece_size() == 3 + 2 + len(vocab.RESIDUES)
  assert [sp.id_to_piece(i) for i in range(5)] == ["<pad>", "</s>", "<unk>", "[NLU]", "[S2S]"]
  for letter in vocab.RESIDUES:
    ids = sp.encode(letter)
    assert len(ids) == 1 and ids[0] > 4, letter
  assert len({sp.encode(r)[0] for r in vocab.RESIDUES}) == len(vocab.RESIDUES)
  seq = "MKTAYIAKQRQISFVKSHFSRQ"
  assert vocab.encode(seq) == [3] + [sp.encode(r)[0] for r in seq] + [vocab.EOS_ID]
  assert vocab.encode(seq, prefix=vocab.S2S_TOKEN, add_eos=False)[0] == 4


def test_lower_case_encodes_like_upper_case():
  assert vocab.encode("mkvlaxbzuo") == vocab.encode("MKVLAXBZUO")
  assert vocab.get_processor().decode(vocab.encode("mkv", add_eos=False)) == "[NLU]MKV"


def test_unknown_letters_become_unk():
  sp = vocab.get_processor()
  assert sp.encode("MJK") == [sp.encode("M")[0], vocab.UNK_ID, sp.encode("K")[0]]
  # SentencePiece merges a run of unknown characters into one <unk>: validate input first
  # (the FASTA reader rejects such letters with a clear error).
  assert sp.encode("J*1") == [vocab.UNK_ID]


def test_seqio_vocabulary_has_256_ids_with_sentinels_on_top():
  v = vocab.get_vocabulary()
  assert v.vocab_size == 256
  assert v.decode([vocab.sentinel_id(0, 256)]).strip() == "<extra_id_0>"
  assert v.decode([vocab.sentinel_id(225, 256)]).strip() == "<extra_id_225>"
  assert vocab.sentinel_id(225, 256) == 30  # first id after the 30 pieces
  assert v.encode("[NLU]MKV") == vocab.encode("MKV", add_eos=False)


def test_missing_vocabulary_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="vocabulary file not found: .*nope.model"):
    vocab.get_processor(str(tmp_path / "nope.model"))


def test_build_script_reproduces_the_shipped_pieces(tmp_path):
  spec = importlib.util.spec_from_file_location(
      "build_vocab", os.path.join(REPO, "scripts", "build_vocab.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out = str(tmp_path / "rebuilt.model")
  module.build(out)
  rebuilt, shipped = spm.SentencePieceProcessor(model_file=out), vocab.get_processor()
  pieces = lambda sp: [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
  assert pieces(rebuilt) == pieces(shipped)
  assert rebuilt.encode("[S2S]mkvXBZUO") == shipped.encode("[S2S]mkvXBZUO")
