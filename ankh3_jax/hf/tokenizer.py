"""Hugging Face T5 tokenizers: the checkpoint's vocabulary and `extra_ids` on import, the
tokenizer files written on export."""
import dataclasses
import json
import logging
import os
import re
import shutil

from ankh3_jax import vocab as vocab_lib
from ankh3_jax.hf import config as hf_config

SPIECE_FILE = "spiece.model"
_SENTINEL_RE = re.compile(r"^<extra_id_(\d+)>$")


@dataclasses.dataclass(frozen=True)
class VocabInfo:
  """The tokenizer of an imported checkpoint, in seqio terms (pieces + `extra_ids`)."""
  spiece_path: str
  extra_ids: int
  rule: str                               # which source decided `extra_ids`
  num_pieces: int
  unmapped_tokens: tuple[str, ...] = ()   # added tokens seqio cannot represent

  @property
  def size(self) -> int:
    return self.num_pieces + self.extra_ids


def _token_text(token) -> str:
  return token["content"] if isinstance(token, dict) else str(token)


def hf_vocab_info(hf_dir: str, model_vocab_size: int) -> VocabInfo:
  """Reads the checkpoint's tokenizer and finds its `extra_ids` (see docs/conversion.md).

  Rule, first that applies: (1) the ids of `<extra_id_N>` tokens listed with ids in
  tokenizer.json / tokenizer_config.json (`added_tokens_decoder`) / added_tokens.json,
  which must sit on top of the pieces with `<extra_id_0>` highest (seqio's layout);
  (2) `extra_ids` in tokenizer_config.json, else the count of `<extra_id_N>` names in the
  special-token lists; (3) config vocab_size minus the pieces of spiece.model.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  spiece = os.path.join(hf_dir, SPIECE_FILE)
  if not os.path.isfile(spiece):  # transformers 5 saves tokenizer.json only
    from ankh3_jax.hf import tokenizer_json  # pylint: disable=g-import-not-at-top
    spiece = tokenizer_json.spiece_for_checkpoint(hf_dir)
  try:
    processor = spm.SentencePieceProcessor(model_file=spiece)
  except Exception as e:  # sentencepiece raises RuntimeError / OSError
    raise ValueError(f"corrupt {spiece}: {e}") from e
  pieces = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
  num_pieces = len(pieces)
  tok_cfg = hf_config.read_json(os.path.join(hf_dir, "tokenizer_config.json")) or {}
  special_map = hf_config.read_json(os.path.join(hf_dir, "special_tokens_map.json")) or {}
  tok_json = hf_config.read_json(os.path.join(hf_dir, "tokenizer.json")) or {}
  added_json = hf_config.read_json(os.path.join(hf_dir, "added_tokens.json")) or {}

  with_ids: dict[str, int] = {}
  listed = [(t["content"], t["id"]) for t in tok_json.get("added_tokens", [])]
  listed += [(t["content"], int(i)) for i, t in tok_cfg.get("added_tokens_decoder", {}).items()]
  listed += list(added_json.items())
  for text, token_id in listed:
    if with_ids.setdefault(text, int(token_id)) != int(token_id):
      raise ValueError(f"{hf_dir}: token {text} has ids {with_ids[text]} and {token_id} in "
                       "different tokenizer files")
  sentinels, unmapped = {}, []
  for text, token_id in sorted(with_ids.items(), key=lambda kv: kv[1]):
    match = _SENTINEL_RE.match(text)
    if text in pieces:
      if pieces[text] != token_id:
        raise ValueError(f"{hf_dir}: token {text} has id {token_id} in the tokenizer files but "
                         f"{pieces[text]} in {SPIECE_FILE}")
    elif match:
      sentinels[int(match.group(1))] = token_id
    else:
      unmapped.append(f"{text} (id {token_id})")

  if sentinels:
    extra_ids, rule = len(sentinels), "ids of the <extra_id_N> tokens in the tokenizer files"
    for index in range(extra_ids):
      expect = num_pieces + extra_ids - 1 - index
      if sentinels.get(index) != expect:
        raise ValueError(f"{hf_dir}: <extra_id_{index}> has id {sentinels.get(index)}; "
                         f"seqio's layout (pieces, then sentinels with <extra_id_0> highest) "
                         f"needs {expect}")
  else:
    names = {_token_text(t) for key in ("additional_special_tokens", "extra_special_tokens")
             for source in (tok_cfg, special_map) for t in (source.get(key) or [])
             if isinstance(source.get(key), list)}
    named = len([t for t in names if _SENTINEL_RE.match(t) and t not in pieces])
    declared = tok_cfg.get("extra_ids")
    if isinstance(declared, int) and declared > 0:
      if named and named != declared:
        raise ValueError(f"{hf_dir}: tokenizer_config.json says extra_ids={declared} but lists "
                         f"{named} <extra_id_N> tokens")
      extra_ids, rule = declared, "extra_ids in tokenizer_config.json"
    elif named:
      extra_ids, rule = named, "count of <extra_id_N> special tokens"
    else:
      extra_ids = max(model_vocab_size - num_pieces, 0)
      rule = "config vocab_size minus spiece.model pieces (no tokenizer metadata)"
      logging.warning("%s: no sentinel metadata in the tokenizer files; assuming extra_ids=%d",
                      hf_dir, extra_ids)
  if num_pieces + extra_ids > model_vocab_size:
    raise ValueError(f"{hf_dir}: the tokenizer has {num_pieces + extra_ids} ids "
                     f"({num_pieces} pieces + {extra_ids} extra ids) but the model embeds only "
                     f"{model_vocab_size}")
  for text, token_id in pieces.items():  # sentinels that are pieces of the model itself
    match = _SENTINEL_RE.match(text)
    if match and token_id != num_pieces + extra_ids - 1 - int(match.group(1)):
      logging.warning("%s: %s is piece %d of spiece.model, not where seqio's sentinel layout "
                      "puts it; masking preprocessors will use other ids", hf_dir, text, token_id)
  if unmapped:
    logging.warning("%s: added tokens outside spiece.model that seqio cannot encode: %s",
                    hf_dir, ", ".join(unmapped))
  return VocabInfo(spiece, extra_ids, rule, num_pieces, tuple(unmapped))


def build_hf_tokenizer(vocab_path: str, extra_ids: int):
  """A `tokenizers.Tokenizer` giving the ids of seqio's vocabulary(vocab_path, extra_ids).

  It follows the SentencePiece model's own normalizer spec (our vocabulary adds no dummy
  prefix), which transformers 5.x's T5Tokenizer would override.
  """
  try:
    # pylint: disable=g-import-not-at-top,g-multiple-import
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors
    # pylint: enable=g-import-not-at-top,g-multiple-import
  except ImportError as e:
    raise ImportError("writing Hugging Face tokenizer files needs the `tokenizers` package "
                      "(pip install 'ankh3_jax[parity]')") from e
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  proto = sentencepiece_model_pb2.ModelProto()
  with open(vocab_path, "rb") as f:
    proto.ParseFromString(f.read())
  trainer, norm = proto.trainer_spec, proto.normalizer_spec
  if trainer.model_type not in (1, 4):  # UNIGRAM, CHAR
    raise ValueError(f"{vocab_path}: only unigram / char SentencePiece models can be exported")
  num_pieces = len(proto.pieces)
  vocab = [(p.piece, p.score) for p in proto.pieces]
  vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))]
  tokenizer = Tokenizer(models.Unigram(vocab, unk_id=trainer.unk_id,
                                       byte_fallback=trainer.byte_fallback))
  steps = []
  if norm.precompiled_charsmap:
    steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
  if norm.remove_extra_whitespaces:
    steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
  if steps:
    tokenizer.normalizer = normalizers.Sequence(steps)
  if norm.escape_whitespaces:
    prepend = "always" if norm.add_dummy_prefix else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme=prepend, split=trainer.split_by_whitespace)
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=prepend,
                                           split=trainer.split_by_whitespace)
  special = [AddedToken(p.piece, special=True, normalized=False)
             for p in proto.pieces if p.type in (2, 3)]  # UNKNOWN, CONTROL
  special += [AddedToken(f"<extra_id_{i}>", special=True, normalized=False)
              for i in range(extra_ids)]
  tokenizer.add_special_tokens(special)
  tokenizer.add_tokens([AddedToken(p.piece, special=False, normalized=True)
                        for p in proto.pieces if p.type == 4])  # USER_DEFINED
  if trainer.eos_id >= 0:
    eos = proto.pieces[trainer.eos_id].piece
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, trainer.eos_id)])
  if tokenizer.get_vocab_size() != num_pieces + extra_ids:
    raise AssertionError("tokenizer size differs from pieces + extra_ids")
  return tokenizer


def write_hf_tokenizer(out_dir: str, vocab_path: str, extra_ids: int) -> None:
  """spiece.model + tokenizer.json + tokenizer_config.json + special_tokens_map.json.

  `tokenizer_class` is PreTrainedTokenizerFast so AutoTokenizer uses tokenizer.json as is.
  """
  tokenizer = build_hf_tokenizer(vocab_path, extra_ids)
  shutil.copyfile(vocab_path, os.path.join(out_dir, SPIECE_FILE))
  tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
  pad, eos, unk = (tokenizer.id_to_token(i) for i in
                   (vocab_lib.PAD_ID, vocab_lib.EOS_ID, vocab_lib.UNK_ID))
  sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
  special = {"pad_token": pad, "eos_token": eos, "unk_token": unk,
             "additional_special_tokens": sentinels}
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump(special, f, indent=2)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "extra_ids": extra_ids,
               **special}, f, indent=2)
