"""Per-residue input features for the heads: frozen encoder embeddings, one-hot residues
or a one-hot window of each residue and its neighbours."""
from typing import Optional, Sequence

import numpy as np

from ankh3_jax import embed
from ankh3_jax import inference
from ankh3_jax import vocab

ONEHOT_ALPHABET = vocab.RESIDUES


def onehot(sequences: Sequence[str]) -> list:
  """One-hot residue features [L, 25] per sequence (the no-language-model baseline)."""
  index = {c: i for i, c in enumerate(ONEHOT_ALPHABET)}
  out = []
  for seq in sequences:
    x = np.zeros((len(seq), len(ONEHOT_ALPHABET)), np.float32)
    x[np.arange(len(seq)), [index[c] for c in seq.upper()]] = 1.0
    out.append(x)
  return out


def onehot_window(sequences: Sequence[str], radius: int = 7) -> list:
  """One-hot residues of each position and its `radius` neighbours on each side
  [L, (2 radius + 1) * 25] per sequence: block k (columns 25 k to 25 k + 24) is the
  residue at offset k - radius, all zeros beyond the sequence's ends. The context-free
  baseline that still sees local sequence (radius 0 is `onehot`)."""
  if radius < 0:
    raise ValueError(f"radius must be >= 0, got {radius}")
  out = []
  for x in onehot(sequences):
    padded = np.pad(x, ((radius, radius), (0, 0)))
    out.append(np.concatenate([padded[k:k + len(x)] for k in range(2 * radius + 1)], axis=1))
  return out


def embeddings(model: inference.ModelArg, sequences: Sequence[str], *, prefix: str = "nlu",
               dtype: str = "float32", token_budget: int = embed.DEFAULT_TOKEN_BUDGET,
               progress: bool = False) -> list:
  """Frozen per-residue encoder embeddings [L, d_model] per sequence; pass an
  `embed.Embedder` as `model` to reuse its compiled buckets across calls."""
  results = embed.embed_sequences(model, list(sequences), prefix=prefix, dtype=dtype,
                                  token_budget=token_budget, progress=progress)
  return [r.per_residue for r in results]


def token_ids(sequences: Sequence[str], vocab_path: Optional[str] = None,
              prefix: str = vocab.NLU_TOKEN) -> list:
  """`prefix + residues + eos` ids per sequence, for fine-tuning the encoder itself."""
  path = vocab_path or vocab.VOCAB_PATH
  return [np.asarray(inference.tokenize(s, prefix, path), np.int32) for s in sequences]
