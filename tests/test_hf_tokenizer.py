"""Importing checkpoints whose tokenizer was saved by transformers 5 (tokenizer.json only).

The pinned transformers (5.x) re-saves a T5 tokenizer loaded from spiece.model as
tokenizer.json + tokenizer_config.json, without spiece.model; checked below, not assumed.
"""
import functools
import gzip
import json
import os
import shutil

import numpy as np
import pytest

import hf_fixtures as hf
from ankh3_jax import convert
from ankh3_jax.hf import tokenizer as hf_tokenizer
from ankh3_jax.hf import tokenizer_json
from ankh3_jax import model_io
from ankh3_jax import vocab as vocab_lib

pytest.importorskip("transformers")
CORPUS = os.path.join(os.path.dirname(vocab_lib.VOCAB_PATH), "corpus", "validation.fasta.gz")


@functools.lru_cache(maxsize=None)
def resaved_checkpoint() -> str:
  """A tiny HF model with its tokenizer loaded and re-saved by the pinned transformers."""
  import transformers  # pylint: disable=g-import-not-at-top

  source = hf.checkpoint("gelu_untied_b8")  # spiece.model + 4.x tokenizer configs
  directory = os.path.join(os.path.dirname(source), "resaved_by_transformers5")
  hf.hf_model("gelu_untied_b8").save_pretrained(directory)
  transformers.AutoTokenizer.from_pretrained(source).save_pretrained(directory)
  return directory


def _sequences(count=40):
  out = []
  with gzip.open(CORPUS, "rt") as f:
    for line in f:
      if not line.startswith(">"):
        out.append(line.strip())
      if len(out) == count:
        break
  return out


def test_pinned_transformers_saves_no_spiece_model():
  files = sorted(os.listdir(resaved_checkpoint()))
  assert "tokenizer.json" in files and "spiece.model" not in files, files


def test_rebuilt_vocabulary_gives_the_checkpoints_ids():
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  info = hf_tokenizer.hf_vocab_info(resaved_checkpoint(), hf.VOCAB_SIZE)
  assert (info.num_pieces, info.extra_ids) == (30, 226)
  assert info.rule == "ids of the <extra_id_N> tokens in the tokenizer files"
  rebuilt = spm.SentencePieceProcessor(model_file=info.spiece_path)
  ours = vocab_lib.get_processor()
  with open(os.path.join(resaved_checkpoint(), "tokenizer.json"), encoding="utf-8") as f:
    listed = [piece for piece, _ in json.load(f)["model"]["vocab"]]
  assert [rebuilt.id_to_piece(i) for i in range(rebuilt.get_piece_size())] == listed[:30]
  assert (rebuilt.pad_id(), rebuilt.eos_id(), rebuilt.unk_id(), rebuilt.bos_id()) == (0, 1, 2, -1)
  sequences = _sequences()
  for text in ([f"[NLU]{s}" for s in sequences] + [f"[S2S]{s.lower()}" for s in sequences]
               + ["MKV[S2S]QQ", "MJ*1K"]):
    assert rebuilt.encode(text) == ours.encode(text), text


def edited_checkpoint(directory: str, edit) -> str:
  """A copy of the re-saved checkpoint in `directory` with `edit(tokenizer_json)` applied."""
  shutil.copytree(resaved_checkpoint(), directory)
  path = os.path.join(directory, "tokenizer.json")
  with open(path, encoding="utf-8") as f:
    tok_json = json.load(f)
  edit(tok_json)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(tok_json, f)
  return directory


def test_ids_follow_tokenizer_json_not_our_vocabulary(tmp_path):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  ids = {}

  def swap_a_and_m(tok_json):
    vocab = tok_json["model"]["vocab"]
    ids.update((piece, i) for i, (piece, _) in enumerate(vocab) if piece in ("A", "M"))
    vocab[ids["A"]], vocab[ids["M"]] = vocab[ids["M"]], vocab[ids["A"]]

  directory = edited_checkpoint(str(tmp_path / "swapped"), swap_a_and_m)
  a, m = ids["A"], ids["M"]
  rebuilt = spm.SentencePieceProcessor(model_file=tokenizer_json.spiece_for_checkpoint(directory))
  assert rebuilt.piece_to_id("M") == a and rebuilt.piece_to_id("A") == m
  assert rebuilt.encode("MA") == [a, m]


def test_import_and_cli_without_spiece_model(tmp_path):
  config, params, info = convert.import_hf(resaved_checkpoint())
  _, reference, reference_info = hf.imported("gelu_untied_b8")
  assert info.extra_ids == reference_info.extra_ids
  np.testing.assert_array_equal(params["encoder"]["encoder_norm"]["scale"],
                                reference["encoder"]["encoder_norm"]["scale"])
  out = str(tmp_path / "model")
  assert convert.main(["import", resaved_checkpoint(), out]) == 0
  _, loaded, spiece = model_io.load_model(out)
  assert os.path.basename(spiece) == "spiece.model"
  assert vocab_lib.get_processor(spiece).encode("[NLU]MKV") == [3, 16, 14, 25]
  assert model_io.load_extra_ids(out) == 226
  assert set(loaded) == set(params) and config.vocab_size == hf.VOCAB_SIZE


def test_bad_tokenizer_json_is_named(tmp_path):
  directory = edited_checkpoint(str(tmp_path / "bpe"), lambda tok_json: tok_json.update(
      model={"type": "BPE", "vocab": {}, "merges": []}))
  path = os.path.join(directory, "tokenizer.json")
  with pytest.raises(ValueError, match=r"bpe/tokenizer.json: model type 'BPE'; only a Unigram"):
    convert.import_hf(directory)
  with open(path, "w", encoding="utf-8") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match=r"bpe/tokenizer.json: not valid JSON"):
    convert.import_hf(directory)
  os.remove(path)
  with pytest.raises(FileNotFoundError, match="spiece.model is missing and there is no "
                                              "tokenizer.json"):
    convert.import_hf(directory)
