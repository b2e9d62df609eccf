"""The pre-training objectives in NumPy, for accelerator hosts without TensorFlow.

The seqio tasks (`tasks/pretrain.py`) are the data path of every `ankh3-train` run. A GPU
or TPU image often lacks TensorFlow, and a small model on a fast chip needs its host to
make examples quickly; this module makes the same examples from the same rules:

  MLM         `preprocessors.random_crop` (a uniformly placed window of inputs - 2
              residues), `preprocessors.mask_residues`: m = floor(p * n + 0.5) residues,
              at least 1, each replaced by its own sentinel, inputs `[NLU]` + residues,
              targets the (sentinel, residue) pairs, then eos on both;
  completion  `preprocessors.complete_sequence` with window='n_terminus': the first
              min(inputs - 2, targets - 1) residues, cut at floor(f * n), inputs `[S2S]` +
              prefix + eos, targets the rest (+ eos only at the real C-terminus);

then seqio's `EncDecFeatureConverter(pack=False)` layout. The random draws are NumPy's,
not TF's stateless ones: the rules agree example for example (tests/test_host_objectives.py
checks lengths, counts and round trips against the seqio tasks), the draws do not.
"""
import dataclasses
from typing import Iterator, Mapping, Sequence

import numpy as np

from ankh3_jax import vocab as vocab_lib


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """Token ids the objectives need."""
  residue_table: np.ndarray   # byte -> residue id (either case), UNK elsewhere
  nlu_id: int
  s2s_id: int
  vocab_size: int = 256
  eos_id: int = vocab_lib.EOS_ID
  num_sentinels: int = vocab_lib.NUM_SENTINELS

  @classmethod
  def from_vocabulary(cls, path: str = vocab_lib.VOCAB_PATH) -> "TokenLayout":
    processor = vocab_lib.get_processor(path)
    table = np.full(256, vocab_lib.UNK_ID, np.int32)
    for letter in vocab_lib.RESIDUES:
      table[ord(letter)] = table[ord(letter.lower())] = processor.piece_to_id(letter)
    return cls(table, processor.piece_to_id(vocab_lib.NLU_TOKEN),
               processor.piece_to_id(vocab_lib.S2S_TOKEN),
               processor.get_piece_size() + vocab_lib.NUM_SENTINELS)

  def encode(self, sequence: str) -> np.ndarray:
    return self.residue_table[np.frombuffer(sequence.encode("ascii"), np.uint8)]


@dataclasses.dataclass(frozen=True)
class Objective:
  """One task of a mixture: 'mlm' at `probability`, or 'completion'."""
  kind: str
  probability: float = 0.0
  rate: float = 1.0

  @property
  def name(self) -> str:
    return f"mlm_p{round(self.probability * 100):d}" if self.kind == "mlm" else self.kind


# The shipped objectives (gin_configs/objectives/*.gin): the paper's 1:1 MLM/completion
# mixture with MLM sharing its half evenly over 15/20/30%, and the three ablation arms.
MIXTURES = {
    "ankh3": [Objective("mlm", p, 0.5 / 3) for p in (0.15, 0.20, 0.30)]
             + [Objective("completion", rate=0.5)],
    "mlm15_only": [Objective("mlm", 0.15)],
    "mlm_multi": [Objective("mlm", p, 1.0 / 3) for p in (0.15, 0.20, 0.30)],
    "completion_only": [Objective("completion")],
}
EVAL_OBJECTIVES = [Objective("mlm", p) for p in (0.15, 0.20, 0.30)] + [
    Objective("completion")]


def num_masked(n: int, probability: float, cap: int) -> int:
  """As `preprocessors.num_masked`: floor(p * n + 0.5), at least 1, at most min(n, cap)."""
  return min(max(int(np.floor(probability * n + 0.5)), 1), n, cap)


def mlm_example(tokens: np.ndarray, probability: float, rng: np.random.Generator,
                layout: TokenLayout, cap: int) -> tuple:
  """(inputs, targets) with eos; sentinel k (id V-1-k) replaces the k-th masked residue."""
  n = len(tokens)
  m = num_masked(n, probability, cap)
  mask = np.zeros(n, bool)
  mask[rng.choice(n, m, replace=False)] = True
  sentinels = layout.vocab_size - np.cumsum(mask)
  inputs = np.concatenate([[layout.nlu_id], np.where(mask, sentinels, tokens),
                           [layout.eos_id]])
  pairs = np.stack([sentinels[mask], tokens[mask]], 1).reshape(-1)
  return inputs.astype(np.int32), np.append(pairs, layout.eos_id).astype(np.int32)


def completion_example(tokens: np.ndarray, limit: int, fraction: float,
                       layout: TokenLayout) -> tuple:
  """(inputs, targets): the N-terminal window of `limit` residues cut at `fraction`."""
  window = tokens[:limit]
  cut = min(max(int(np.floor(fraction * len(window))), 1), len(window) - 1)
  targets = window[cut:]
  if len(window) == len(tokens):
    targets = np.append(targets, layout.eos_id)
  inputs = np.concatenate([[layout.s2s_id], window[:cut], [layout.eos_id]])
  return inputs.astype(np.int32), targets.astype(np.int32)


def make_example(tokens: np.ndarray, objective: Objective, lengths: Mapping[str, int],
                 rng: np.random.Generator, layout: TokenLayout,
                 completion_fraction: float = 0.5) -> tuple:
  """One (inputs, targets) pair of `objective` from a sequence's residue ids."""
  if objective.kind == "mlm":
    limit = lengths["inputs"] - 2
    start = rng.integers(0, max(len(tokens) - limit, 0) + 1)
    cap = min(layout.num_sentinels, (lengths["targets"] - 1) // 2)
    return mlm_example(tokens[start:start + limit], objective.probability, rng, layout, cap)
  if objective.kind == "completion":
    limit = min(lengths["inputs"] - 2, lengths["targets"] - 1)
    return completion_example(tokens, limit, completion_fraction, layout)
  raise ValueError(f"unknown objective kind {objective.kind!r}")


def convert(examples: Sequence[tuple], lengths: Mapping[str, int]) -> dict:
  """EncDecFeatureConverter(pack=False): padded encoder/decoder arrays of a batch."""
  batch = len(examples)
  out = {k: np.zeros((batch, lengths[f]), np.int32) for k, f in (
      ("encoder_input_tokens", "inputs"), ("decoder_target_tokens", "targets"),
      ("decoder_input_tokens", "targets"))}
  for row, (inputs, targets) in enumerate(examples):
    inputs, targets = inputs[:lengths["inputs"]], targets[:lengths["targets"]]
    out["encoder_input_tokens"][row, :len(inputs)] = inputs
    out["decoder_target_tokens"][row, :len(targets)] = targets
    out["decoder_input_tokens"][row, 1:len(targets)] = targets[:-1]
  out["decoder_loss_weights"] = (out["decoder_target_tokens"] > 0).astype(np.float32)
  return out


def check_lengths(objectives: Sequence[Objective], lengths: Mapping[str, int]) -> None:
  """Raises `preprocessors.MaskingCapError`'s rule (without importing TF)."""
  for objective in objectives:
    if objective.kind == "mlm":
      n = max(lengths["inputs"] - 2, 1)
      needed = 2 * max(int(np.floor(objective.probability * n + 0.5)), 1) + 1
      if needed > lengths["targets"] or (needed - 1) // 2 > vocab_lib.NUM_SENTINELS:
        raise ValueError(f"{objective.name} at inputs={lengths['inputs']} needs targets "
                         f">= {needed}, got {lengths['targets']}")


def train_batches(sequences: Sequence[np.ndarray], objectives: Sequence[Objective],
                  lengths: Mapping[str, int], batch_size: int, seed: int,
                  layout: TokenLayout) -> Iterator[dict]:
  """Endless batches: sequences drawn uniformly with replacement, each example's task
  drawn by the mixture rates."""
  check_lengths(objectives, lengths)
  rng = np.random.default_rng(seed)
  rates = np.array([o.rate for o in objectives], np.float64)
  rates /= rates.sum()
  while True:
    picks = rng.integers(0, len(sequences), batch_size)
    kinds = rng.choice(len(objectives), batch_size, p=rates)
    yield convert([make_example(sequences[i], objectives[k], lengths, rng, layout)
                   for i, k in zip(picks, kinds)], lengths)


def eval_batches(sequences: Sequence[np.ndarray], objective: Objective,
                 lengths: Mapping[str, int], batch_size: int, seed: int,
                 layout: TokenLayout) -> list:
  """Every validation sequence once as `objective` (fixed draws), in padded batches."""
  rng = np.random.default_rng(seed)
  examples = [make_example(s, objective, lengths, rng, layout) for s in sequences
              if len(s) >= (2 if objective.kind == "completion" else 1)]
  batches = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    chunk += [(np.zeros(0, np.int32), np.zeros(0, np.int32))] * (batch_size - len(chunk))
    batches.append(convert(chunk, lengths))
  return batches
