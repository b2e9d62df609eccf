"""Fine-tuning library: train a downstream head (optionally with the encoder) on labelled
examples and score it against the task's trivial baseline.

`fit(task, train, model=..., features=...)` returns a `Trained` with `.predict` and
`.evaluate`; `load_task_data` gives the shipped chains' (or a CSV's) train and evaluation
examples. Tasks, their labels, heads, losses and metrics are the records of
`downstream.tasks`; the training loop is `downstream.training.HeadTrainer`; the command
line is `ankh3-finetune` (`downstream.cli`).

Features: frozen per-residue embeddings of a model (`embed`), the same encoder fine-tuned
end to end (`finetune`), or one-hot residues (`onehot`, the no-language-model baseline).
Heads: ConvBERT (default) or a linear probe.
"""
import dataclasses
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np

from ankh3_jax import embed
from ankh3_jax import inference
from ankh3_jax.downstream import benchmarks
from ankh3_jax.downstream import features as feats
from ankh3_jax.downstream import tasks
from ankh3_jax.downstream import training
from ankh3_jax.downstream import user_data

TASKS = tasks.NAMES
LENGTH_QUANTUM = training.LENGTH_QUANTUM
Example = tasks.Example
make_batch = training.make_batch
padded_length = training.padded_length


@dataclasses.dataclass
class Result:
  """Held-out outcome of one run."""
  task: str
  metric_name: str
  metric: float
  baseline_name: str
  baseline: float
  train_examples: int
  eval_examples: int
  steps: int
  seconds: float
  extra: dict = dataclasses.field(default_factory=dict)

  @property
  def margin(self) -> float:
    return self.metric - self.baseline


# ---------------------------------------------------------------------------------------
# Examples.


def ss_benchmark_examples(task: str, records: Sequence[benchmarks.SSRecord]) -> list:
  """Labelled examples of `task` ('ss3' or 'ss8') from benchmark CSV records."""
  return [e for _, e in tasks.state_examples(task, records)]


def fitness_examples(records: Sequence[benchmarks.FitnessRecord]) -> list:
  return [e for _, e in tasks.fitness_examples(records)]


# ---------------------------------------------------------------------------------------
# Training.


def _inputs_for(examples: Sequence[Example], features: str, encoder, progress: bool) -> list:
  """Token ids ('finetune'), one-hot ('onehot') or embeddings ('embed': `encoder` is an
  `embed.Embedder`, kept across calls so its compiled buckets are reused)."""
  sequences = [e.sequence for e in examples]
  if features == "finetune":
    return feats.token_ids(sequences, encoder.vocab_path)
  if features == "onehot":
    return feats.onehot(sequences)
  return feats.embeddings(encoder, sequences, progress=progress)


class Trained:
  """A trained head (and encoder, when fine-tuned) that scores example sets."""

  def __init__(self, trainer, params, features, head, encoder, batch_size, train, steps,
               seconds, quantum, label_stats):
    self.task = trainer.task.name
    self.trainer, self.params = trainer, params
    self.features, self.head, self.encoder = features, head, encoder
    self.batch_size, self.train, self.steps, self.train_seconds = (batch_size, train, steps,
                                                                   seconds)
    self.quantum, self.label_stats = quantum, label_stats

  def predict(self, examples: Sequence[Example], progress: bool = False) -> list:
    """Per example, the task's prediction: class ids [L] (SS), contact logits [L, L],
    values [L] (burial) or a value (fitness), in the label's units."""
    inputs = _inputs_for(examples, self.features, self.encoder, progress)
    return self.trainer.predict(self.params, examples, inputs, batch_size=self.batch_size,
                                label_stats=self.label_stats, quantum=self.quantum)

  def evaluate(self, examples: Sequence[Example], progress: bool = False,
               predictions: Optional[list] = None) -> Result:
    """Metric and baseline on `examples` (`predictions`: theirs, if already made)."""
    start = time.time()
    if predictions is None:
      predictions = self.predict(examples, progress)
    scored = self.trainer.task.score(predictions, examples, self.train)
    scored["extra"].update(features=self.features, head=self.head,
                           eval_seconds=time.time() - start)
    return Result(task=self.task, train_examples=len(self.train),
                  eval_examples=len(examples), steps=self.steps,
                  seconds=self.train_seconds, **scored)


def fit(task: str, train: Sequence[Example], *, model: Optional[inference.ModelArg] = None,
        features: str = "embed", head: str = "convbert", steps: int = 300,
        batch_size: int = 16, learning_rate: float = 1e-3,
        encoder_learning_rate: float = 1e-4, dropout: float = 0.2, seed: int = 0,
        length_quantum: int = LENGTH_QUANTUM, progress: bool = False,
        log_every: int = 0) -> Trained:
  """Trains a head on `train`.

  Args:
    features: 'embed' (frozen embeddings of `model`), 'finetune' (train `model`'s encoder
      too) or 'onehot' (no model).
    length_quantum: batches are padded to a multiple of this; one compile per multiple
      (a value >= the longest sequence gives a single compiled shape).
  """
  record = tasks.get(task)
  if features not in ("embed", "finetune", "onehot"):
    raise ValueError(f"features must be 'embed', 'finetune' or 'onehot', got {features!r}")
  if features != "onehot" and model is None:
    raise ValueError(f"features={features!r} needs a model (--model_dir)")
  if not train:
    raise ValueError("no training examples")
  start_time = time.time()
  encoder = inference.resolve_model(model) if features != "onehot" else None
  if features == "embed":
    encoder = embed.Embedder(encoder)
  train_in = _inputs_for(train, features, encoder, progress)

  tokens = features == "finetune"
  trainer = training.HeadTrainer(
      record, record.make_head(head, dropout),
      training.make_optimizer(steps, learning_rate, encoder_learning_rate if tokens else None),
      encoder.config if tokens else None)
  rng, init_rng = jax.random.split(jax.random.PRNGKey(seed))
  sample = make_batch(record, train[:1], train_in[:1], 1, tokens)
  width = encoder.config.d_model if tokens else sample["inputs"].shape[-1]
  params = trainer.init(init_rng, sample, width)
  if tokens:
    params["encoder"] = inference.encoder_params(encoder.params)
  label_stats = record.label_stats(train)  # regression targets: standardised
  params = trainer.train(params, train, train_in, steps=steps, batch_size=batch_size,
                         order=np.random.default_rng(seed), rng=rng, label_stats=label_stats,
                         quantum=length_quantum, log_every=log_every)
  if tokens:  # score with the fine-tuned encoder
    encoder = dataclasses.replace(encoder, params={**encoder.params, **params["encoder"]})
  return Trained(trainer, params, features, head, encoder, min(batch_size, len(train)),
                 list(train), steps, time.time() - start_time, length_quantum, label_stats)


def train_and_evaluate(task: str, train: Sequence[Example], evaluate: Sequence[Example],
                       **kwargs) -> Result:
  """`fit` on `train`, then `evaluate` on `evaluate`."""
  return fit(task, train, **kwargs).evaluate(evaluate)


# ---------------------------------------------------------------------------------------
# Data.


def load_task_data(task: str, *, fitness_csv: Optional[str] = None,
                   eval_split: str = "test", train_limit: Optional[int] = None,
                   eval_limit: Optional[int] = None):
  """(train, evaluate) examples of a task: the shipped chains, or a user CSV
  (`fitness_csv`, any task that reads CSVs; see `user_data.from_csv`)."""
  if fitness_csv:
    sets = user_data.from_csv(task, fitness_csv, eval_split=eval_split,
                              train_limit=train_limit, eval_limit=eval_limit)
  else:
    sets = user_data.shipped(task, eval_split, train_limit, eval_limit)
  return sets.train, sets.evaluations[0][1]


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m ankh3_jax.downstream.finetune`: the `ankh3-finetune` command."""
  from ankh3_jax.downstream import cli  # pylint: disable=g-import-not-at-top
  return cli.main(argv)


if __name__ == "__main__":
  sys.exit(main())
