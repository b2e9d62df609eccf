"""Downstream metrics (numpy): per-residue accuracy (Q3/Q8), Spearman's rho, long-range
contact precision at L/5, and the trivial baselines they are compared with."""
from typing import Sequence

import numpy as np

from ankh3_jax.downstream.data import IGNORE, LONG_RANGE


def residue_accuracy(predictions: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> float:
  """Accuracy over all scored residues of all proteins (Q3 / Q8); IGNORE labels skipped."""
  correct = total = 0
  for pred, label in zip(predictions, labels):
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
      raise ValueError(f"prediction shape {pred.shape} != label shape {label.shape}")
    scored = label != IGNORE
    correct += int(np.sum((pred == label) & scored))
    total += int(np.sum(scored))
  if not total:
    raise ValueError("no scored residues")
  return correct / total


def majority_class(labels: Sequence[np.ndarray], num_classes: int) -> int:
  """Most frequent scored class in `labels` (ties: lowest index)."""
  counts = np.zeros(num_classes, np.int64)
  for label in labels:
    label = np.asarray(label)
    counts += np.bincount(label[label != IGNORE], minlength=num_classes)[:num_classes]
  return int(np.argmax(counts))


def rankdata(x: np.ndarray) -> np.ndarray:
  """Ranks 1..n with ties given their average rank."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="mergesort")
  ranks = np.empty(len(x), np.float64)
  sorted_x = x[order]
  start = 0
  for end in range(1, len(x) + 1):
    if end == len(x) or sorted_x[end] != sorted_x[start]:
      ranks[order[start:end]] = (start + end + 1) / 2.0
      start = end
  return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rank correlation (Pearson on average ranks); nan if either is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"need two 1-D arrays of one length, got {x.shape} and {y.shape}")
  if len(x) < 2:
    raise ValueError("Spearman needs at least 2 points")
  rx, ry = rankdata(x) - (len(x) + 1) / 2.0, rankdata(y) - (len(y) + 1) / 2.0
  denom = np.sqrt(np.sum(rx * rx) * np.sum(ry * ry))
  return float(np.sum(rx * ry) / denom) if denom > 0 else float("nan")


def _long_range_pairs(length: int, min_separation: int):
  return np.triu_indices(length, k=min_separation)


def contact_precision(scores: np.ndarray, contacts: np.ndarray,
                      min_separation: int = LONG_RANGE, fraction: float = 0.2) -> float:
  """Precision of the top `fraction * L` pairs with |i-j| >= min_separation.

  `scores` and `contacts` are [L, L]; only the upper triangle is read. With the default
  fraction 0.2 this is long-range P@L/5. Proteins too short to have such pairs give nan.
  """
  scores, contacts = np.asarray(scores), np.asarray(contacts)
  length = contacts.shape[0]
  if scores.shape != (length, length) or contacts.shape != (length, length):
    raise ValueError(f"need [L, L] arrays, got {scores.shape} and {contacts.shape}")
  rows, cols = _long_range_pairs(length, min_separation)
  if not len(rows):
    return float("nan")
  top = max(1, int(length * fraction))
  pair_scores = scores[rows, cols]
  order = np.argsort(-pair_scores, kind="mergesort")[:top]
  return float(np.mean(contacts[rows[order], cols[order]]))


def mean_contact_precision(scores: Sequence[np.ndarray], contacts: Sequence[np.ndarray],
                           min_separation: int = LONG_RANGE, fraction: float = 0.2) -> float:
  """Mean over proteins of `contact_precision` (proteins without pairs skipped)."""
  values = [contact_precision(s, c, min_separation, fraction) for s, c in zip(scores, contacts)]
  values = [v for v in values if not np.isnan(v)]
  if not values:
    raise ValueError("no protein has pairs at that separation")
  return float(np.mean(values))


def random_contact_precision(contacts: Sequence[np.ndarray],
                             min_separation: int = LONG_RANGE) -> float:
  """Expected precision of random ranking: mean long-range contact density per protein."""
  values = []
  for c in contacts:
    rows, cols = _long_range_pairs(c.shape[0], min_separation)
    if len(rows):
      values.append(float(np.mean(c[rows, cols])))
  if not values:
    raise ValueError("no protein has pairs at that separation")
  return float(np.mean(values))
