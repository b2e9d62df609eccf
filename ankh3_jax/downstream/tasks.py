"""The downstream tasks as data: one `Task` record each, in `TABLE`.

A record says everything that differs between tasks: the labels (from a shipped chain, a
user CSV, and their letters), the head, where labels go in a batch, the loss, how a
head's output becomes a prediction, the metric and its trivial baseline. Fine-tuning
(`finetune`), the ablation's probes (`ankh3_jax.ablation.probes`) and the seqio
text-to-text tasks (`ankh3_jax.tasks.downstream`) read this table; none of them switches
on a task's name. Adding a task is adding a record here (and its test in
tests/test_downstream.py).

  ss3       per residue H/E/C            residue classifier  cross-entropy    Q3 (majority)
  ss8       per residue DSSP HGIEBTSC    residue classifier  cross-entropy    Q8 (majority)
  contacts  CB-CB < 8 A, [L, L]          contact predictor   BCE, |i-j| >= 6  P@L/5 (random)
  burial    CB neighbours within 10 A    residue regressor   squared error    rho (constant)
  fitness   one number per sequence      sequence regressor  squared error    rho (constant)
Regression labels are standardised with the train set's mean and std for training;
predictions come back in the label's units.
"""
import dataclasses
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax

from ankh3_jax.downstream import benchmarks
from ankh3_jax.downstream import data
from ankh3_jax.downstream import heads
from ankh3_jax.downstream import metrics

MIN_TRAIN_SEPARATION = 6   # contact loss ignores pairs closer in sequence


@dataclasses.dataclass(frozen=True)
class Example:
  id: str
  sequence: str
  label: np.ndarray        # [L] int (per residue), [L, L] bool (pairs) or [] float


@dataclasses.dataclass(frozen=True)
class CsvColumns:
  """Column names of a user CSV; None: recognise the usual names (`benchmarks`)."""
  sequence: Optional[str] = None
  label: Optional[str] = None
  split: Optional[str] = None
  id: Optional[str] = None
  mask: Optional[str] = None


# ---------------------------------------------------------------------------------------
# Batch label layouts.


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where an example's label goes in a batch: one per residue ([B, L]), one per residue
  pair ([B, L, L]) or one per sequence ([B]); padding holds `fill`."""
  level: str
  dtype: type
  fill: float

  def empty(self, batch_size: int, length: int) -> np.ndarray:
    shape = {"residue": (batch_size, length), "pair": (batch_size, length, length),
             "sequence": (batch_size,)}[self.level]
    return np.full(shape, self.fill, self.dtype)

  def put(self, batch_label: np.ndarray, row: int, label: np.ndarray) -> None:
    if self.level == "sequence":
      batch_label[row] = label
    elif self.level == "pair":
      batch_label[row, :len(label), :len(label)] = label
    else:
      batch_label[row, :len(label)] = label

  def window(self, label: np.ndarray, start: int, end: int) -> np.ndarray:
    """The label of residues start..end-1."""
    if self.level == "sequence":
      return label
    return label[start:end, start:end] if self.level == "pair" else label[start:end]

  def unpad(self, output: np.ndarray, length: int) -> np.ndarray:
    """One example's head output without its padding."""
    if self.level == "sequence":
      return output
    return output[:length, :length] if self.level == "pair" else output[:length]


PER_RESIDUE = Layout("residue", np.int32, data.IGNORE)
PER_PAIR = Layout("pair", np.float32, 0.0)
PER_SEQUENCE = Layout("sequence", np.float32, 0.0)


# ---------------------------------------------------------------------------------------
# Losses: (head outputs, batch, label_stats [mean, std]) -> scalar.


def residue_cross_entropy(outputs, batch, label_stats):
  del label_stats
  label = batch["label"]
  scored = (label != data.IGNORE).astype(jnp.float32) * batch["mask"]
  ce = optax.softmax_cross_entropy_with_integer_labels(outputs, jnp.maximum(label, 0))
  return jnp.sum(ce * scored) / jnp.maximum(jnp.sum(scored), 1.0)


def _separation_mask(length: int, minimum: int) -> np.ndarray:
  idx = np.arange(length)
  return (np.abs(idx[:, None] - idx[None, :]) >= minimum).astype(np.float32)


def pair_binary_cross_entropy(outputs, batch, label_stats):
  del label_stats
  mask = batch["mask"]
  weight = mask[:, :, None] * mask[:, None, :] * _separation_mask(outputs.shape[1],
                                                                MIN_TRAIN_SEPARATION)
  bce = optax.sigmoid_binary_cross_entropy(outputs, batch["label"])
  return jnp.sum(bce * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def residue_squared_error(outputs, batch, label_stats):
  """Squared error of one output per residue against the standardised label."""
  scored = (batch["label"] != data.IGNORE).astype(jnp.float32) * batch["mask"]
  target = (batch["label"] - label_stats[0]) / label_stats[1]
  return jnp.sum(scored * (outputs[..., 0] - target) ** 2) / jnp.maximum(jnp.sum(scored), 1.0)


def sequence_squared_error(outputs, batch, label_stats):
  """Squared error of one output per sequence against the standardised label."""
  rows = (jnp.sum(batch["mask"], axis=1) > 0).astype(jnp.float32)
  target = (batch["label"] - label_stats[0]) / label_stats[1]
  return jnp.sum(rows * (outputs - target) ** 2) / jnp.maximum(jnp.sum(rows), 1.0)


# ---------------------------------------------------------------------------------------
# Predictions: (one example's unpadded output, label_stats) -> prediction.


def class_ids(output, label_stats) -> np.ndarray:
  del label_stats
  return np.argmax(output, axis=-1)


def pair_logits(output, label_stats) -> np.ndarray:
  del label_stats
  return output


def residue_values(output, label_stats) -> np.ndarray:
  """One value per residue, in the label's units."""
  return output[:, 0].astype(np.float64) * float(label_stats[1]) + float(label_stats[0])


def sequence_value(output, label_stats) -> float:
  """The sequence's value, in the label's units."""
  return float(output) * float(label_stats[1]) + float(label_stats[0])


# ---------------------------------------------------------------------------------------
# Metrics: (predictions, examples, train examples) -> {metric_name, metric, baseline_name,
# baseline, extra}.


def _accuracy_scorer(classes: str, metric_name: str) -> Callable:
  def score(predictions, examples, train) -> dict:
    labels = [e.label for e in examples]
    majority = metrics.majority_class([e.label for e in train], len(classes))
    baseline = metrics.residue_accuracy([np.full_like(l, majority) for l in labels], labels)
    return dict(metric_name=metric_name, metric=metrics.residue_accuracy(predictions, labels),
                baseline_name="majority class", baseline=baseline,
                extra={"majority_class": classes[majority]})
  return score


def score_contacts(predictions, examples, train) -> dict:
  del train
  labels = [e.label for e in examples]
  return dict(metric_name="long-range P@L/5",
              metric=metrics.mean_contact_precision(predictions, labels),
              baseline_name="random ranking",
              baseline=metrics.random_contact_precision(labels),
              extra={"P@L/5 |i-j|>=12": metrics.mean_contact_precision(predictions, labels,
                                                                       12)})


def score_residue_spearman(predictions, examples, train) -> dict:
  del train
  rho = metrics.spearman(np.concatenate(predictions),
                         np.concatenate([e.label for e in examples]))
  return dict(metric_name="Spearman rho (per residue)", metric=rho,
              baseline_name="constant prediction", baseline=0.0, extra={})


def score_spearman(predictions, examples, train) -> dict:
  del train
  return dict(metric_name="Spearman", metric=metrics.spearman(predictions,
                                                              [e.label for e in examples]),
              baseline_name="constant prediction", baseline=0.0, extra={})


# ---------------------------------------------------------------------------------------
# Labels from user CSVs: (path, CsvColumns) -> [(split, Example)].


def state_examples(task, records: Sequence[benchmarks.SSRecord]) -> list:
  """[(split, Example)] of secondary-structure records for a task with letter labels."""
  record = get(task)
  out = []
  for r in records:
    text = getattr(r, record.name)
    if text is None:
      raise ValueError(f"record {r.id!r} has no {record.name} labels (8-state labels give "
                       "both tasks, 3-state labels only ss3)")
    out.append((r.split, Example(r.id, r.sequence, data.encode_labels(text, record.classes))))
  return out


def _state_reader(states: str) -> Callable:
  def read(path: str, columns: CsvColumns) -> list:
    label_column = {"ss3_column" if states == "ss3" else "ss8_column": columns.label}
    records = benchmarks.load_secondary_structure(
        path, sequence_column=columns.sequence, mask_column=columns.mask,
        split_column=columns.split, id_column=columns.id, **label_column)
    if getattr(records[0], states) is None:
      raise benchmarks.BenchmarkError(path, f"no {states} labels (8-state labels give both "
                                      "tasks, 3-state labels only ss3)")
    return state_examples(states, records)
  return read


def fitness_examples(records: Sequence[benchmarks.FitnessRecord]) -> list:
  """[(split, Example)] of fitness records."""
  return [(r.split, Example(r.id, r.sequence, np.float32(r.target))) for r in records]


def read_fitness_csv(path: str, columns: CsvColumns) -> list:
  return fitness_examples(benchmarks.load_fitness(
      path, sequence_column=columns.sequence, target_column=columns.label,
      split_column=columns.split, id_column=columns.id))


def _letters(classes: str) -> Callable:
  return lambda ids: "".join(classes[i] if i >= 0 else "-" for i in np.asarray(ids))


def _number(value) -> str:
  """The shortest text that reads back as the same float32 (the labels' precision)."""
  return str(np.float32(value))


# ---------------------------------------------------------------------------------------
# The table.


@dataclasses.dataclass(frozen=True)
class Task:
  """Everything task-specific about a downstream task (see the module docstring)."""
  name: str
  description: str
  layout: Layout
  make_head: Callable[[str, float], nn.Module]      # (kind, dropout) -> head
  loss: Callable
  decode: Callable
  score: Callable
  classes: str = ""                  # label i is classes[i]; "" for numeric labels
  standardize: bool = False          # train on (label - mean) / std of the train labels
  chain_states: Optional[Callable[[data.Chain], str]] = None   # letters (seqio targets)
  chain_label: Optional[Callable[[data.Chain], np.ndarray]] = None
  read_csv: Optional[Callable[[str, CsvColumns], list]] = None
  to_text: Optional[Callable] = None  # a label or prediction as CSV text

  def chain_examples(self, chains: Sequence[data.Chain]) -> list:
    """Labelled examples from shipped chains."""
    if self.chain_label is None:
      raise ValueError(f"task {self.name!r} has no shipped data; give your own CSV "
                       "(--data_csv)")
    return [Example(c.id, c.sequence, self.chain_label(c)) for c in chains]

  def label_stats(self, train: Sequence[Example]) -> np.ndarray:
    """[mean, std] float32 of the train labels when standardised, else [0, 1]."""
    if not self.standardize:
      return np.array([0.0, 1.0], np.float32)
    values = np.concatenate([np.ravel(e.label) for e in train]).astype(np.float32)
    return np.array([values.mean(), values.std() or 1.0], np.float32)


def _states_task(name: str, classes: str, metric_name: str, states_of: Callable,
                 description: str) -> Task:
  return Task(
      name=name, description=description, layout=PER_RESIDUE,
      make_head=lambda kind, dropout: heads.ResidueClassifier(len(classes), kind=kind,
                                                              dropout=dropout),
      loss=residue_cross_entropy, decode=class_ids,
      score=_accuracy_scorer(classes, metric_name), classes=classes,
      chain_states=states_of,
      chain_label=lambda c: data.encode_labels(states_of(c), classes),
      read_csv=_state_reader(name), to_text=_letters(classes))


TABLE = {t.name: t for t in (
    _states_task("ss3", data.SS3_CLASSES, "Q3", lambda c: c.ss3,
                 "3-state secondary structure H/E/C per residue (DSSP H/G/I -> H, "
                 "E/B -> E, rest -> C)"),
    _states_task("ss8", data.SS8_CLASSES, "Q8", lambda c: c.dssp8,
                 "8-state DSSP secondary structure HGIEBTSC per residue (coil C)"),
    Task(name="contacts",
         description="CB-CB contacts below 8 Angstrom, per residue pair",
         layout=PER_PAIR,
         make_head=lambda kind, dropout: heads.ContactPredictor(kind=kind, dropout=dropout),
         loss=pair_binary_cross_entropy, decode=pair_logits, score=score_contacts,
         chain_label=lambda c: data.contact_map(c.cb)),
    Task(name="burial",
         description="CB atoms within 10 Angstrom of each residue's CB (burial)",
         layout=PER_RESIDUE,
         make_head=lambda kind, dropout: heads.ResidueClassifier(1, kind=kind,
                                                                 dropout=dropout),
         loss=residue_squared_error, decode=residue_values, score=score_residue_spearman,
         standardize=True, chain_label=lambda c: data.burial_counts(c.cb)),
    Task(name="fitness",
         description="one number per sequence (fitness, fluorescence, stability)",
         layout=PER_SEQUENCE,
         make_head=lambda kind, dropout: heads.SequenceRegressor(kind=kind, dropout=dropout),
         loss=sequence_squared_error, decode=sequence_value, score=score_spearman,
         standardize=True, read_csv=read_fitness_csv, to_text=_number),
)}
NAMES = tuple(TABLE)


def get(task) -> Task:
  """The record of `task` (a name or a `Task`)."""
  if isinstance(task, Task):
    return task
  if task not in TABLE:
    raise ValueError(f"unknown task {task!r}; choose from {NAMES}")
  return TABLE[task]
