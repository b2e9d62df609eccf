"""Train and evaluation sets of a downstream task: the shipped chains or a user CSV; and
the per-example predictions written back as CSV.

A user CSV is split by its split column when it has one (`set`/`split`, or the one
named): the rows of the evaluation split are scored, the `train` rows train (or, when no
row says `train`, e.g. ProteinGym's fold columns, every row of another split). Without a
split column, a separate evaluation CSV is the given split; else a random one, with its
seed reported.
"""
import csv
import dataclasses
import io
from typing import Optional, Sequence

import numpy as np

from ankh3_jax import output_paths
from ankh3_jax.downstream import benchmarks
from ankh3_jax.downstream import data
from ankh3_jax.downstream import tasks

SHIPPED_NOUN = "chains"   # the shipped set: PDB chains


@dataclasses.dataclass
class TaskData:
  """Examples to train on and the named sets to evaluate; `split` says how they were made."""
  train: list
  evaluations: list        # [(name, examples, noun)]; noun: 'chains', 'sequences', 'variants'
  split: str

  def add_csv(self, task, path: str, columns: tasks.CsvColumns,
              limit: Optional[int] = None) -> None:
    """Also evaluates on all rows of the CSV `path`."""
    examples = [e for _, e in read_csv(task, path, columns)]
    self.evaluations.append((path, _limit(examples, limit), noun_of(path)))


def _limit(items: list, n: Optional[int]) -> list:
  return items if not n else items[:n]


def shipped(task, eval_split: str = "test", train_limit: Optional[int] = None,
            eval_limit: Optional[int] = None) -> TaskData:
  """The shipped structure set: train split -> `eval_split` ('validation' or 'test')."""
  record = tasks.get(task)
  if eval_split not in ("validation", "test"):
    raise ValueError(f"the shipped data have splits 'validation' and 'test', not "
                     f"{eval_split!r}")
  train = record.chain_examples(data.load_chains("train", limit=train_limit))
  evaluate = record.chain_examples(data.load_chains(eval_split, limit=eval_limit))
  return TaskData(train, [(f"shipped {eval_split}", evaluate, SHIPPED_NOUN)],
                  f"shipped splits: train ({len(train)}) -> {eval_split} ({len(evaluate)})")


def noun_of(path: str) -> str:
  """'variants' for ProteinGym-style files (rows are variants of one protein), else
  'sequences'."""
  return "variants" if benchmarks.describes_variants(path) else "sequences"


def read_csv(task, path: str, columns: tasks.CsvColumns = tasks.CsvColumns()) -> list:
  """[(split, Example)] of a user CSV (split '' when the file has no split column)."""
  record = tasks.get(task)
  if record.read_csv is None:
    readable = [t.name for t in tasks.TABLE.values() if t.read_csv is not None]
    raise ValueError(f"task {record.name!r} does not read CSV files; tasks that do: "
                     f"{readable}")
  return record.read_csv(path, columns)


def from_csv(task, path: str, *, columns: tasks.CsvColumns = tasks.CsvColumns(),
             eval_split: str = "test", eval_csv: Optional[str] = None,
             eval_fraction: float = 0.2, split_seed: int = 0,
             train_limit: Optional[int] = None,
             eval_limit: Optional[int] = None) -> TaskData:
  """Train and evaluation sets from the user CSV `path` (see the module docstring)."""
  rows = read_csv(task, path, columns)
  noun = noun_of(path)
  splits = [s for s, _ in rows]
  if any(splits):
    named = sorted(set(splits))
    evaluate = [e for s, e in rows if s == eval_split]
    if "train" in named:
      train = [e for s, e in rows if s == "train"]
    else:
      train = [e for s, e in rows if s != eval_split]
    if not evaluate or not train:
      raise benchmarks.BenchmarkError(
          path, f"split column values are {named}: need rows of the evaluation split "
          f"{eval_split!r} (--eval_split) and others to train on")
    note = (f"split column of {path}: {len(train)} train {noun}, {len(evaluate)} "
            f"{eval_split!r} {noun}")
    evaluations = [(eval_split, _limit(evaluate, eval_limit), noun)]
  elif eval_csv:
    train = [e for _, e in rows]
    note = f"given split: {len(train)} train {noun} ({path}), evaluation on {eval_csv}"
    evaluations = []
  else:
    train, evaluate = random_split([e for _, e in rows], eval_fraction, split_seed, path)
    note = (f"random split of {len(rows)} {noun} (seed {split_seed}, --split_seed): "
            f"{len(train)} train, {len(evaluate)} evaluation")
    evaluations = [("random split", _limit(evaluate, eval_limit), noun)]
  sets = TaskData(_limit(train, train_limit), evaluations, note)
  if eval_csv:
    sets.add_csv(task, eval_csv, columns, eval_limit)
  return sets


def random_split(examples: list, eval_fraction: float, seed: int, path: str = "data"):
  """(train, evaluate): a random `eval_fraction` of `examples` evaluates; both keep the
  file's order."""
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"--eval_fraction must be between 0 and 1, got {eval_fraction}")
  n_eval = int(round(len(examples) * eval_fraction))
  if n_eval < 2 or len(examples) - n_eval < 1:
    raise ValueError(f"{path}: {len(examples)} rows are too few for a random split with "
                     f"--eval_fraction {eval_fraction} (need 2 or more to evaluate and "
                     "1 or more to train)")
  held_out = set(np.random.default_rng(seed).permutation(len(examples))[:n_eval].tolist())
  train = [e for i, e in enumerate(examples) if i not in held_out]
  evaluate = [e for i, e in enumerate(examples) if i in held_out]
  return train, evaluate


def predictions_csv(task, sets: Sequence[tuple]) -> str:
  """CSV text of per-example predictions: eval_set, id, sequence, label, prediction;
  `sets` are (name, examples, predictions)."""
  record = tasks.get(task)
  if record.to_text is None:
    raise ValueError(f"task {record.name!r} has no per-example CSV form")
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["eval_set", "id", "sequence", "label", "prediction"])
  for name, examples, predictions in sets:
    for example, prediction in zip(examples, predictions):
      writer.writerow([name, example.id, example.sequence, record.to_text(example.label),
                       record.to_text(prediction)])
  return out.getvalue()


def write_predictions(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (checked earlier by `output_paths`)."""
  with output_paths.atomic_file(path, "w", encoding="utf-8", newline="") as f:
    f.write(text)
