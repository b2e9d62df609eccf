"""The vocabulary of a Hugging Face checkpoint that has tokenizer.json but no spiece.model.

transformers 5 saves T5 tokenizers as tokenizer.json + tokenizer_config.json only. Its
Unigram model lists every id with its piece and score, so the SentencePiece model that seqio
needs is rebuilt from it: the same pieces in the same order (ids are the checkpoint's own),
the trailing `<extra_id_N>` entries left to seqio's `extra_ids`, special tokens as control
pieces, and the normalizer / whitespace settings that tokenizer.json describes, with one
exception: transformers 5's T5Tokenizer always asks for a `▁` prefix (Metaspace, prepend
"always"), which with a vocabulary that has no `▁` piece (Ankh's) can only give `<unk>`;
there the prefix is dropped, as the original SentencePiece model has it (see
docs/conversion.md).
"""
import atexit
import base64
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any

TOKENIZER_JSON = "tokenizer.json"
_SENTINEL_RE = re.compile(r"^<extra_id_(\d+)>$")
# sentencepiece ModelProto.SentencePiece.Type / TrainerSpec.ModelType values.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
_UNIGRAM = 1
_rebuilt_dir = None


def _fail(path: str, reason: str) -> ValueError:
  return ValueError(f"{path}: {reason}")


def _read(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except ValueError as e:
    raise _fail(path, f"not valid JSON ({e})") from e
  if not isinstance(data, dict):
    raise _fail(path, "not a JSON object")
  return data


def _steps(component: Any) -> list[dict]:
  """A tokenizers normalizer / pre-tokenizer as its list of steps (Sequence flattened)."""
  if not isinstance(component, dict):
    return []
  inner = component.get("normalizers") or component.get("pretokenizers")
  if component.get("type") == "Sequence" and isinstance(inner, list):
    return [step for part in inner for step in _steps(part)]
  return [component]


def _special_pieces(tok_json: dict, tok_cfg: dict) -> tuple[dict[str, bool], dict[str, str]]:
  """Added tokens (content -> special) and the pad / eos / unk / bos token names."""
  added = {t["content"]: bool(t.get("special")) for t in tok_json.get("added_tokens", [])
           if isinstance(t, dict) and "content" in t}
  roles = {}
  for role, default in (("pad", "<pad>"), ("eos", "</s>"), ("unk", "<unk>"), ("bos", None)):
    value = tok_cfg.get(f"{role}_token", default)
    value = value.get("content") if isinstance(value, dict) else value
    if value:
      roles[role] = value
  return added, roles


def model_proto_from_tokenizer_json(hf_dir: str):
  """The SentencePiece `ModelProto` rebuilt from `hf_dir`/tokenizer.json (see module doc)."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  path = os.path.join(hf_dir, TOKENIZER_JSON)
  tok_json = _read(path)
  cfg_path = os.path.join(hf_dir, "tokenizer_config.json")
  tok_cfg = _read(cfg_path) if os.path.isfile(cfg_path) else {}
  model = tok_json.get("model")
  if not isinstance(model, dict) or model.get("type") != "Unigram":
    kind = model.get("type") if isinstance(model, dict) else None
    raise _fail(path, f"model type {kind!r}; only a Unigram model (SentencePiece) can give "
                      "seqio's vocabulary")
  vocab = model.get("vocab")
  if (not isinstance(vocab, list) or not vocab
      or not all(isinstance(e, list) and len(e) == 2 for e in vocab)):
    raise _fail(path, "model.vocab is not a list of [piece, score] pairs")
  num_pieces = len(vocab)
  while num_pieces and _SENTINEL_RE.match(str(vocab[num_pieces - 1][0])):
    num_pieces -= 1  # seqio adds the sentinels on top of the pieces itself
  if not num_pieces:
    raise _fail(path, "model.vocab holds sentinels only")
  added, roles = _special_pieces(tok_json, tok_cfg)
  unk_id = model.get("unk_id")
  if not isinstance(unk_id, int) or not 0 <= unk_id < num_pieces:
    raise _fail(path, f"model.unk_id {unk_id!r} is not the id of a piece")

  proto = sentencepiece_model_pb2.ModelProto()
  role_ids = {}
  for index, (piece, score) in enumerate(vocab[:num_pieces]):
    entry = proto.pieces.add()
    entry.piece, entry.score = str(piece), float(score)
    if index == unk_id:
      entry.type = _UNKNOWN
    elif added.get(entry.piece) or entry.piece in roles.values():
      entry.type = _CONTROL
    elif entry.piece in added:
      entry.type = _USER_DEFINED
    else:
      entry.type = _NORMAL
    for role, name in roles.items():
      if name == entry.piece:
        role_ids[role] = index
  trainer = proto.trainer_spec
  trainer.model_type = _UNIGRAM
  trainer.vocab_size = num_pieces
  trainer.unk_id = unk_id
  trainer.unk_piece = proto.pieces[unk_id].piece
  for role in ("bos", "eos", "pad"):
    setattr(trainer, f"{role}_id", role_ids.get(role, -1))
    if role in role_ids:
      setattr(trainer, f"{role}_piece", roles[role])
  trainer.byte_fallback = bool(model.get("byte_fallback"))

  norm = proto.normalizer_spec
  norm.name = "identity"
  norm.add_dummy_prefix = norm.remove_extra_whitespaces = norm.escape_whitespaces = False
  for step in _steps(tok_json.get("normalizer")):
    if step.get("type") == "Precompiled" and step.get("precompiled_charsmap"):
      norm.name = "nmt_nfkc"
      norm.precompiled_charsmap = base64.b64decode(step["precompiled_charsmap"])
    elif step.get("type") in ("Strip", "Replace"):
      norm.remove_extra_whitespaces = True
  for step in _steps(tok_json.get("pre_tokenizer")):
    if step.get("type") == "Metaspace":
      norm.escape_whitespaces = True
      norm.add_dummy_prefix = step.get("prepend_scheme", "always") != "never"
      trainer.split_by_whitespace = bool(step.get("split", True))
  replacement = "\u2581"
  if norm.add_dummy_prefix and not any(p.piece.startswith(replacement) for p in proto.pieces):
    logging.info("%s: no piece starts with %s, so its prefix could only encode as <unk>; "
                 "rebuilt without it", path, replacement)
    norm.add_dummy_prefix = False
  return proto


def spiece_from_tokenizer_json(hf_dir: str) -> str:
  """Path of the SentencePiece model rebuilt from `hf_dir`/tokenizer.json.

  Written to a temporary folder removed at interpreter exit; `model_io.save_model`
  copies it into the model directory as spiece.model.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  global _rebuilt_dir
  proto = model_proto_from_tokenizer_json(hf_dir)
  if _rebuilt_dir is None:
    _rebuilt_dir = tempfile.mkdtemp(prefix="ankh3_hf_spiece_")
    atexit.register(shutil.rmtree, _rebuilt_dir, ignore_errors=True)
  out = os.path.join(tempfile.mkdtemp(dir=_rebuilt_dir), "spiece.model")
  with open(out, "wb") as f:
    f.write(proto.SerializeToString())
  try:
    spm.SentencePieceProcessor(model_file=out)
  except Exception as e:  # sentencepiece raises RuntimeError / OSError
    raise _fail(os.path.join(hf_dir, TOKENIZER_JSON),
                f"its vocabulary does not make a valid SentencePiece model ({e})") from e
  return out


def spiece_for_checkpoint(hf_dir: str) -> str:
  """The vocabulary of a checkpoint without spiece.model: rebuilt from its tokenizer.json."""
  if not os.path.isfile(os.path.join(hf_dir, TOKENIZER_JSON)):
    raise FileNotFoundError(f"{hf_dir}: spiece.model is missing and there is no "
                            f"{TOKENIZER_JSON} either; the converter takes token ids from the "
                            "checkpoint's own tokenizer files")
  return spiece_from_tokenizer_json(hf_dir)
