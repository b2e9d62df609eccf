"""A synthetic protein source with known entropies: a stationary order-1 Markov chain
over the 20 standard residues (numpy only, no TensorFlow).

For learning checks: the Bayes-optimal predictions of the pre-training targets are
known exactly, so a model's cross-entropy can be placed between the unigram baseline
(context ignored) and the best any model can do (`masked_posteriors`,
`completion_posteriors`). Every sequence starts from the stationary distribution, so
each position (and any crop) has the unigram marginal.
"""
import dataclasses
from typing import Sequence

import numpy as np

from ankh3_jax import vocab as vocab_lib
from ankh3_jax.data import fasta

STANDARD_RESIDUES = vocab_lib.RESIDUES[:20]


@dataclasses.dataclass(frozen=True, eq=False)
class MarkovChain:
  """`transitions[a, b]` = P(next residue b | residue a), indices into STANDARD_RESIDUES."""
  transitions: np.ndarray

  def __post_init__(self):
    t = np.asarray(self.transitions, np.float64)
    if t.shape != (20, 20) or (t < 0).any() or not np.allclose(t.sum(1), 1.0):
      raise ValueError("transitions must be a 20 x 20 row-stochastic matrix")
    object.__setattr__(self, "transitions", t)

  @classmethod
  def peaked(cls, seed: int, successors: int = 2, mass: float = 0.85) -> "MarkovChain":
    """Each residue goes to one of `successors` random residues with total probability
    `mass` (split 2:1:..., decreasing), and anywhere uniformly otherwise."""
    rng = np.random.default_rng(seed)
    weights = 0.5 ** np.arange(successors)
    t = np.full((20, 20), (1.0 - mass) / 20)
    for a in range(20):
      t[a, rng.choice(20, successors, replace=False)] += mass * weights / weights.sum()
    return cls(t)

  @classmethod
  def independent(cls, probabilities: Sequence[float]) -> "MarkovChain":
    """Residues drawn independently from `probabilities`: context carries nothing."""
    p = np.asarray(probabilities, np.float64)
    return cls(np.tile(p / p.sum(), (20, 1)))

  @property
  def stationary(self) -> np.ndarray:
    """The stationary distribution (left eigenvector of eigenvalue 1)."""
    values, vectors = np.linalg.eig(self.transitions.T)
    p = np.real(vectors[:, np.argmin(np.abs(values - 1.0))])
    return p / p.sum()

  def unigram_entropy(self) -> float:
    p = self.stationary
    return float(-(p * np.log(p)).sum())

  def forward_entropy(self) -> float:
    """H(X_t | X_{t-1}) in nats: the Bayes-optimal next-residue cross-entropy."""
    t = self.transitions
    return float(-(self.stationary[:, None] * t * np.log(t)).sum())

  def sample(self, rng: np.random.Generator, lengths: Sequence[int]) -> list:
    """One sequence (string) per entry of `lengths`."""
    lengths = np.asarray(lengths)
    cumulative = np.cumsum(self.transitions, axis=1)
    states = np.empty((len(lengths), int(lengths.max())), np.int64)
    states[:, 0] = rng.choice(20, len(lengths), p=self.stationary)
    for i in range(1, states.shape[1]):
      u = rng.random(len(lengths))[:, None]
      states[:, i] = np.minimum((u > cumulative[states[:, i - 1]]).sum(1), 19)
    letters = np.array(list(STANDARD_RESIDUES))
    return ["".join(letters[row[:n]]) for row, n in zip(states, lengths)]

  def write_fasta(self, path: str, count: int, min_length: int, max_length: int,
                  seed: int, id_prefix: str = "markov") -> int:
    """Writes `count` sequences of lengths uniform in [min_length, max_length]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_length, max_length + 1, count)
    records = ((f"{id_prefix}_{i}", s) for i, s in enumerate(self.sample(rng, lengths)))
    return fasta.write_fasta(path, records, line_width=None)

  def masked_posteriors(self, states: Sequence[int], masked: Sequence[int]) -> np.ndarray:
    """Bayes posteriors [len(masked), 20] of the masked residues of one MLM example.

    `states`: the residue indices of the whole (cropped) sequence; `masked`: masked
    positions in increasing order, i.e. the order the decoder predicts them. When
    predicting masked position i, everything left of i is known (visible, or an earlier
    target already fed to the decoder), the masked positions right of i are not: so
    P(x | ...) is proportional to T[x_{i-1}, x] (or the stationary p(x) at i = 0) times
    (T^d)[x, x_j] for the first visible position j = i + d to the right, if any.
    """
    states = np.asarray(states)
    masked = np.asarray(masked)
    hidden = np.zeros(len(states), bool)
    hidden[masked] = True
    out = np.empty((len(masked), 20))
    for k, i in enumerate(masked):
      p = self.transitions[states[i - 1]] if i > 0 else self.stationary
      visible_right = np.flatnonzero(~hidden[i + 1:])
      if len(visible_right):
        d = int(visible_right[0]) + 1
        p = p * np.linalg.matrix_power(self.transitions, d)[:, states[i + d]]
      out[k] = p / p.sum()
    return out

  def completion_posteriors(self, prefix: Sequence[int],
                            continuation: Sequence[int]) -> np.ndarray:
    """Bayes posteriors [len(continuation), 20] of each continuation residue given
    everything before it (the last prefix residue for the first one)."""
    previous = np.concatenate([np.asarray(prefix)[-1:], np.asarray(continuation)[:-1]])
    return self.transitions[previous]
