"""Linear probes of frozen per-residue features on the shipped structure set.

Tasks (train split -> test split), as recorded in `ankh3_jax.downstream.tasks`:
  ss3, ss8   Q3 / Q8                        residue classifier
  contacts   long-range P@L/5 (|i-j| >= 24)  contact predictor (bilinear + separation bias)
  burial     Spearman's rho, per residue    residue regressor (one output)
The burial target is a residue's CB neighbour count: CB atoms of the same chain within
10 Angstrom of its CB (a standard burial / solvent-exposure measure; relative solvent
accessibility itself needs side-chain atoms, which the shipped data do not keep). The
probe regresses standardised counts with a squared error.

Training is `downstream.training.HeadTrainer`, the loop fine-tuning uses; what is here is
the probe recipe: one set of features reused for every task and seed (fine-tuning embeds
at every call), linear heads without dropout, one compiled trainer per task shared by
seeds and feature sets. Contact probes train on random 128-residue windows of each chain
(the [L, L] maps dominate the cost; long-range pairs are still there) and are scored on
whole chains.
"""
import dataclasses
import functools
from typing import Sequence

import jax
import numpy as np

from ankh3_jax import embed
from ankh3_jax.downstream import data
from ankh3_jax.downstream import features as feats
from ankh3_jax.downstream import tasks
from ankh3_jax.downstream import training

BURIAL_RADIUS = data.BURIAL_ANGSTROM
burial_counts = data.burial_counts


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  """Training settings shared by every probe (linear heads: no dropout)."""
  steps: int = 300
  batch_size: int = 16
  learning_rate: float = 1e-2
  length_quantum: int = training.LENGTH_QUANTUM
  contact_crop: int = 128   # contact probes train on random windows of this many residues


def task_examples(task: str, chains: Sequence[data.Chain]) -> list:
  """Labelled examples of a probe task (`tasks.Example`)."""
  return tasks.get(task).chain_examples(chains)


@dataclasses.dataclass(frozen=True)
class OneHot:
  """Features without an encoder: one-hot residues of each position and of its `radius`
  neighbours per side (`features.onehot_window`; radius 0: the residue alone)."""
  radius: int = 0


def features(source, *sequence_sets: Sequence[str]) -> list:
  """Per-residue features of each set of sequences: one-hot residues when `source` is
  None or a `OneHot` ([L, 25], or [L, (2 radius + 1) * 25] for a window), else the
  frozen encoder outputs [L, d_model] of the model `source` (a model directory or
  (config, params); one `embed.Embedder`, so each length compiles once)."""
  if source is None or isinstance(source, OneHot):
    radius = 0 if source is None else source.radius
    return [feats.onehot_window(sequences, radius) for sequences in sequence_sets]
  embedder = embed.Embedder(source)
  return [feats.embeddings(embedder, sequences) for sequences in sequence_sets]


@functools.lru_cache(maxsize=None)
def _trainer(task: str, settings: ProbeSettings) -> training.HeadTrainer:
  """A task's linear probe and optimizer, compiled once for all seeds and feature sets."""
  record = tasks.get(task)
  return training.HeadTrainer(record, record.make_head("linear", 0.0),
                              training.make_optimizer(settings.steps, settings.learning_rate))


def train_probe(task: str, examples: Sequence[tasks.Example], inputs: Sequence[np.ndarray],
                settings: ProbeSettings, seed: int):
  """(parameters, label statistics) of a linear probe trained on (examples, inputs);
  `seed` sets the head's initialisation and the batch order."""
  trainer = _trainer(task, settings)
  sample = training.make_batch(task, examples[:1], inputs[:1], 1, False,
                               settings.length_quantum)
  key = jax.random.PRNGKey(seed)
  params = trainer.init(key, sample, inputs[0].shape[-1])
  label_stats = trainer.task.label_stats(examples)
  params = trainer.train(params, examples, inputs, steps=settings.steps,
                         batch_size=settings.batch_size, order=np.random.default_rng(seed),
                         rng=key, label_stats=label_stats, quantum=settings.length_quantum,
                         crop=settings.contact_crop)
  return params, label_stats


def predict(task: str, trained, examples: Sequence[tasks.Example],
            inputs: Sequence[np.ndarray], settings: ProbeSettings) -> list:
  """Per example: class ids [L] (SS), contact logits [L, L] or burial counts [L];
  `trained` is what `train_probe` returns."""
  params, label_stats = trained
  return _trainer(task, settings).predict(params, examples, inputs,
                                          batch_size=settings.batch_size,
                                          label_stats=label_stats,
                                          quantum=settings.length_quantum)


def score(task: str, outputs: list, test: Sequence[tasks.Example],
          train: Sequence[tasks.Example]) -> dict:
  """{metric, baseline, metric_name, baseline_name, extra} of a probe on `test`."""
  scored = tasks.get(task).score(outputs, test, train)
  scored["extra"] = {k: (v if isinstance(v, str) else float(v))
                     for k, v in scored["extra"].items()}
  return {**scored, "metric": float(scored["metric"]), "baseline": float(scored["baseline"])}


def run_probe(task: str, train: Sequence[tasks.Example], train_inputs: Sequence[np.ndarray],
              test: Sequence[tasks.Example], test_inputs: Sequence[np.ndarray],
              settings: ProbeSettings, seed: int) -> dict:
  """Trains one probe and scores it on `test` (see `score`)."""
  trained = train_probe(task, train, train_inputs, settings, seed)
  return score(task, predict(task, trained, test, test_inputs, settings), test, train)
