"""Residue-level evaluation: the model against the unigram and composition baselines.

What a protein-ML reader expects from "MLM loss": cross-entropy over the *residues* the
model had to predict (masked residues for MLM, continuation residues for completion),
not over the sentinels `<extra_id_N>` and EOS that make up half of the targets and are
predicted almost perfectly from the first steps. Every number here is counted on residue
targets only, per task, beside two baselines scored on the same positions:

  unigram      the training split's residue frequencies (add-half smoothed over the 25
               residue letters): the floor a model that ignores context reaches;
  composition  the sequence's own residues that the model can see (the visible input
               residues and the earlier target residues of the same example) mixed with
               the unigram prior, p(a) = (count(a) + alpha * u(a)) / (n + alpha), with the
               Dirichlet strength alpha tuned on the training split (leave-one-out). The
               strongest simple predictor measured on the shipped corpus (see
               docs/training.md).

The gap (baseline minus model, nats per residue) is positive when the model is better.
Intervals are 95% percentile bootstraps over evaluation sequences (paired for gaps).
EOS targets are reported on their own; `masking_rate` is the share of an MLM example's
residues that were masked (what the objective really did, caps included).

Data flow: the host annotates each eval batch once with per-token baseline scores and
token-class weights (`annotate_batch`); the jitted eval step sums them per example
(`per_example_sums`); `ResidueAccumulator` turns the per-example sums into the metrics.
"""
import dataclasses
import json
import math
import os
from typing import Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ankh3_jax import vocab as vocab_lib

ALPHA_GRID = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 150.0, 200.0, 300.0, 500.0, 1000.0)
DEFAULT_MAX_SEQUENCES = 100_000
BOOTSTRAP_SAMPLES = 1000
# Per-example sums returned by the eval step, in this order (rows of its output).
SUM_KEYS = ("residues", "model_ce", "model_correct", "unigram_ce", "unigram_correct",
            "composition_ce", "composition_correct", "eos", "eos_ce", "eos_correct",
            "sentinels", "visible_residues")
# Per-token features `annotate_batch` adds to a batch.
FEATURE_KEYS = ("residue_weights", "eos_weights", "sentinel_weights",
                "encoder_residue_weights", "unigram_ce", "unigram_correct",
                "composition_ce", "composition_correct")


@dataclasses.dataclass(frozen=True)
class ResidueStats:
  """Training-split residue statistics of one data source, and the token layout.

  residue_ids: token id of each letter of `vocab_lib.RESIDUES` (that order).
  counts: training residues per letter (same order).
  alpha: Dirichlet strength of the composition baseline.
  """
  residue_ids: tuple
  counts: tuple
  alpha: float
  eos_id: int
  first_sentinel_id: int
  sequences: int
  source: str

  @property
  def log_unigram(self) -> np.ndarray:
    counts = np.asarray(self.counts, np.float64) + 0.5
    return np.log(counts / counts.sum())

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Mapping) -> "ResidueStats":
    data = dict(data)
    data["residue_ids"] = tuple(data["residue_ids"])
    data["counts"] = tuple(data["counts"])
    return cls(**data)


def residue_index_table(stats: ResidueStats, vocab_size: int) -> np.ndarray:
  """Token id -> index into RESIDUES, -1 for any other token."""
  size = max(vocab_size, max(stats.residue_ids) + 1, stats.eos_id + 1)
  table = np.full(size, -1, np.int64)
  table[list(stats.residue_ids)] = np.arange(len(stats.residue_ids))
  return table


def letter_counts(sequences: Iterable[str]) -> tuple:
  """(per-letter residue counts over RESIDUES, per-sequence count matrix)."""
  lookup = np.full(256, -1, np.int64)
  for i, letter in enumerate(vocab_lib.RESIDUES):
    lookup[ord(letter)] = lookup[ord(letter.lower())] = i
  rows = []
  for sequence in sequences:
    codes = lookup[np.frombuffer(sequence.encode("ascii", "replace"), np.uint8)]
    rows.append(np.bincount(codes[codes >= 0], minlength=len(vocab_lib.RESIDUES)))
  matrix = np.stack(rows) if rows else np.zeros((0, len(vocab_lib.RESIDUES)), np.int64)
  return matrix.sum(0), matrix


def tune_alpha(per_sequence: np.ndarray, log_unigram: np.ndarray,
               grid: Sequence[float] = ALPHA_GRID) -> float:
  """Dirichlet strength minimising the leave-one-out composition cross-entropy."""
  unigram = np.exp(log_unigram)
  c = per_sequence.astype(np.float64)
  n = c.sum(1, keepdims=True)
  keep = n[:, 0] >= 2
  c, n = c[keep], n[keep]
  if not len(c):
    return float(grid[len(grid) // 2])
  best, best_ce = None, math.inf
  for alpha in grid:
    with np.errstate(divide="ignore", invalid="ignore"):
      log_p = np.log((c - 1 + alpha * unigram) / (n - 1 + alpha))
    ce = -np.sum(np.where(c > 0, c * log_p, 0.0)) / n.sum()
    if ce < best_ce:
      best, best_ce = float(alpha), ce
  return best


def estimate_stats(sequences: Iterable[str], residue_ids: Sequence[int], eos_id: int,
                   first_sentinel_id: int, source: str) -> ResidueStats:
  """Counts residues of the training sequences and tunes the composition strength."""
  totals, per_sequence = letter_counts(sequences)
  if not totals.sum():
    raise ValueError(f"no residues in the training split of {source}")
  counts = tuple(int(x) for x in totals)
  stats = ResidueStats(tuple(int(i) for i in residue_ids), counts, 0.0, int(eos_id),
                       int(first_sentinel_id), int(len(per_sequence)), source)
  return dataclasses.replace(stats, alpha=tune_alpha(per_sequence, stats.log_unigram))


def load_or_estimate(path: Optional[str], key: str, estimate) -> ResidueStats:
  """The stats stored under `key` in the JSON file `path`, else `estimate()` (stored)."""
  stored = {}
  if path and os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      stored = json.load(f)
    if key in stored:
      return ResidueStats.from_json(stored[key])
  stats = estimate()
  if path and jax.process_index() == 0:
    stored[key] = stats.to_json()
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(stored, f, indent=1)
    os.replace(tmp, path)
  return stats


def _segments(tokens: np.ndarray, segment_ids: Optional[np.ndarray]) -> np.ndarray:
  if segment_ids is not None:
    return segment_ids.astype(np.int64)
  return (tokens > 0).astype(np.int64)


def _composition(stats: ResidueStats, enc_index, enc_seg, dec_index, dec_seg):
  """Per-token composition log-probabilities [B, Ld, 25] for the decoder targets."""
  num_res = len(stats.residue_ids)
  batch, enc_len = enc_index.shape
  dec_len = dec_index.shape[1]
  width = max(enc_len, dec_len) + 1
  rows = np.arange(batch)[:, None]
  visible = np.zeros((batch * width, num_res))
  enc_key = (rows * width + enc_seg)[enc_index >= 0]
  np.add.at(visible, (enc_key, enc_index[enc_index >= 0]), 1.0)
  onehot = np.zeros((batch, dec_len, num_res))
  is_res = dec_index >= 0
  onehot[is_res] = np.eye(num_res)[dec_index[is_res]]
  before = np.cumsum(onehot, axis=1) - onehot  # residues earlier in the row
  # Subtract what came before the example's first target token (packed rows).
  start = np.zeros_like(dec_seg)
  for b in range(batch):
    change = np.flatnonzero(np.diff(dec_seg[b], prepend=-1))
    start[b] = np.repeat(change, np.diff(np.append(change, dec_len)))
  before -= before[rows, start]
  counts = visible[rows * width + dec_seg] + before
  prior = stats.alpha * np.exp(stats.log_unigram)
  return np.log((counts + prior) / (counts.sum(-1, keepdims=True) + stats.alpha))


def annotate_batch(batch: Mapping[str, np.ndarray], stats: ResidueStats,
                   vocab_size: int) -> dict:
  """`batch` plus the per-token FEATURE_KEYS (float32, zero outside their class)."""
  table = residue_index_table(stats, vocab_size)
  targets = np.asarray(batch["decoder_target_tokens"]).astype(np.int64)
  inputs = np.asarray(batch["encoder_input_tokens"]).astype(np.int64)
  weights = np.asarray(batch.get("decoder_loss_weights", targets > 0), np.float64)
  dec_seg = _segments(targets, batch.get("decoder_segment_ids"))
  enc_seg = _segments(inputs, batch.get("encoder_segment_ids"))
  dec_index = np.where(weights > 0, table[targets], -1)
  enc_index = table[inputs]
  is_res = dec_index >= 0
  safe = np.maximum(dec_index, 0)
  log_uni = stats.log_unigram
  log_comp = _composition(stats, enc_index, enc_seg, dec_index, dec_seg)
  comp_target = np.take_along_axis(log_comp, safe[..., None], -1)[..., 0]
  features = {
      "residue_weights": is_res,
      "eos_weights": (targets == stats.eos_id) & (weights > 0),
      "sentinel_weights": (targets >= stats.first_sentinel_id) & (weights > 0),
      "encoder_residue_weights": enc_index >= 0,
      "unigram_ce": np.where(is_res, -log_uni[safe], 0.0),
      "unigram_correct": is_res & (safe == np.argmax(log_uni)),
      "composition_ce": np.where(is_res, -comp_target, 0.0),
      "composition_correct": is_res & (np.argmax(log_comp, -1) == safe),
  }
  out = dict(batch)
  out.update({k: v.astype(np.float32) for k, v in features.items()})
  return out


def per_example_sums(batch: Mapping[str, jax.Array], token_ce: jax.Array,
                     token_correct: jax.Array) -> jax.Array:
  """[len(SUM_KEYS), B * W] sums per (row, segment) of an annotated batch (jittable).

  W = max(input, target length) + 1; an example is a (row, segment id) pair, so the
  sums do not depend on how rows are laid out over devices or processes.
  """
  targets = batch["decoder_target_tokens"]
  inputs = batch["encoder_input_tokens"]
  batch_size, dec_len = targets.shape
  width = max(inputs.shape[1], dec_len) + 1
  rows = jnp.arange(batch_size)[:, None]
  seg = lambda tokens, key: (batch[key] if key in batch else (tokens > 0)).astype(jnp.int32)
  dec_key = (rows * width + seg(targets, "decoder_segment_ids")).reshape(-1)
  enc_key = (rows * width + seg(inputs, "encoder_segment_ids")).reshape(-1)
  res, eos = batch["residue_weights"], batch["eos_weights"]
  per_token = {
      "residues": res, "model_ce": token_ce * res, "model_correct": token_correct * res,
      "unigram_ce": batch["unigram_ce"], "unigram_correct": batch["unigram_correct"],
      "composition_ce": batch["composition_ce"],
      "composition_correct": batch["composition_correct"],
      "eos": eos, "eos_ce": token_ce * eos, "eos_correct": token_correct * eos,
      "sentinels": batch["sentinel_weights"]}
  total = batch_size * width
  sums = [jax.ops.segment_sum(per_token[k].reshape(-1), dec_key, total)
          for k in SUM_KEYS[:-1]]
  sums.append(jax.ops.segment_sum(batch["encoder_residue_weights"].reshape(-1), enc_key,
                                  total))
  return jnp.stack(sums)


def _interval(values: np.ndarray) -> tuple:
  return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


class ResidueAccumulator:
  """Collects per-example sums over eval batches; `result()` gives the metrics."""

  def __init__(self, bootstrap_samples: int = BOOTSTRAP_SAMPLES, seed: int = 0):
    self.bootstrap_samples = bootstrap_samples
    self.seed = seed
    self._parts = []

  def add(self, sums: np.ndarray) -> None:
    sums = np.asarray(sums, np.float64)
    keep = (sums[0] > 0) | (sums[SUM_KEYS.index("eos")] > 0)
    self._parts.append(sums[:, keep])

  def result(self) -> dict:
    if not self._parts:
      return {}
    s = dict(zip(SUM_KEYS, np.concatenate(self._parts, axis=1)))
    out = {}
    n = s["residues"].sum()
    if n > 0:
      with_res = s["residues"] > 0
      out.update({
          "residue_loss": s["model_ce"].sum() / n,
          "residue_accuracy": s["model_correct"].sum() / n,
          "unigram_loss": s["unigram_ce"].sum() / n,
          "unigram_accuracy": s["unigram_correct"].sum() / n,
          "composition_loss": s["composition_ce"].sum() / n,
          "composition_accuracy": s["composition_correct"].sum() / n,
          "residues": n, "sequences": float(with_res.sum())})
      out["residue_perplexity"] = math.exp(out["residue_loss"])
      out["gap_unigram"] = out["unigram_loss"] - out["residue_loss"]
      out["gap_composition"] = out["composition_loss"] - out["residue_loss"]
      out.update(self._bootstrap({k: v[with_res] for k, v in s.items()}))
    if s["eos"].sum() > 0:
      out["eos_loss"] = s["eos_ce"].sum() / s["eos"].sum()
      out["eos_accuracy"] = s["eos_correct"].sum() / s["eos"].sum()
      out["eos_tokens"] = s["eos"].sum()
    mlm = s["sentinels"] > 0
    if mlm.any():
      masked = s["residues"][mlm].sum()
      out["masking_rate"] = masked / max(masked + s["visible_residues"][mlm].sum(), 1.0)
    return {k: float(v) for k, v in out.items()}

  def _bootstrap(self, s: dict) -> dict:
    count = len(s["residues"])
    columns = np.stack([s["residues"], s["model_ce"], s["unigram_ce"], s["composition_ce"]])
    rng = np.random.default_rng(self.seed)
    samples = np.stack([columns[:, rng.integers(0, count, count)].sum(1)
                        for _ in range(self.bootstrap_samples)])
    n, model, uni, comp = samples.T
    model, uni, comp = model / n, uni / n, comp / n
    out = {}
    for name, values in (("residue_loss", model), ("gap_unigram", uni - model),
                         ("gap_composition", comp - model)):
      out[f"{name}_ci_low"], out[f"{name}_ci_high"] = _interval(values)
    return out
