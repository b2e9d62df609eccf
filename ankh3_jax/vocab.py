"""The Ankh3 protein vocabulary: one SentencePiece piece per residue, plus mode tokens.

Behaviour (tested):
  * upper and lower case residue letters encode to the same ids;
  * letters outside RESIDUES (e.g. 'J', '*', digits) encode to `<unk>` (id 2); the FASTA
    reader rejects them before they get here, so `<unk>` only appears for direct API use;
  * `[NLU]` and `[S2S]` are single pieces wherever they appear in the text.
A converted Hugging Face checkpoint carries its own `spiece.model`; pass its path to
`get_vocabulary` to use the released token ids.
"""
import functools
import os

ASSETS_DIR = os.path.join(os.path.dirname(__file__), "assets")
VOCAB_PATH = os.path.join(ASSETS_DIR, "ankh3_protein.model")

# The 20 standard amino acids, then the rare / ambiguous codes X B Z U O.
RESIDUES = "ACDEFGHIKLMNPQRSTVWY" + "XBZUO"
NLU_TOKEN = "[NLU]"
S2S_TOKEN = "[S2S]"
CONTROL_TOKENS = (NLU_TOKEN, S2S_TOKEN)
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
# 3 specials + 2 mode tokens + 25 residues = 30 pieces; 226 sentinels bring the total to
# 256, the vocabulary size of the released Ankh3 models.
NUM_SENTINELS = 226


@functools.lru_cache(maxsize=None)
def get_vocabulary(path: str = VOCAB_PATH, extra_ids: int = NUM_SENTINELS):
  """Returns the `seqio.SentencePieceVocabulary` (imports seqio lazily: it pulls in TF)."""
  import seqio  # pylint: disable=g-import-not-at-top

  if not os.path.exists(path):
    raise FileNotFoundError(f"vocabulary file not found: {path}")
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def output_features(vocabulary=None) -> dict:
  """seqio features `inputs` and `targets` of the Ankh3 tasks (eos added, required);
  `vocabulary` defaults to the shipped one."""
  import seqio  # pylint: disable=g-import-not-at-top

  vocabulary = vocabulary or get_vocabulary()
  return {name: seqio.Feature(vocabulary, add_eos=True, required=True)
          for name in ("inputs", "targets")}


@functools.lru_cache(maxsize=None)
def get_processor(path: str = VOCAB_PATH):
  """Returns a plain `sentencepiece.SentencePieceProcessor` (no TensorFlow import)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  if not os.path.exists(path):
    raise FileNotFoundError(f"vocabulary file not found: {path}")
  return spm.SentencePieceProcessor(model_file=path)


def sentinel_id(index: int, vocab_size: int) -> int:
  """Id of `<extra_id_{index}>`: seqio puts `<extra_id_0>` at the highest id."""
  return vocab_size - 1 - index


def encode(sequence: str, prefix: str = NLU_TOKEN, add_eos: bool = True,
           path: str = VOCAB_PATH) -> list[int]:
  """Encodes `prefix + sequence` (+ eos) to ids without TensorFlow."""
  ids = get_processor(path).encode(prefix + sequence)
  return ids + [EOS_ID] if add_eos else ids
