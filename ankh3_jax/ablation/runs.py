"""Run labels: an ablation experiment, optionally with its own pre-training seed.

`ankh3` trains experiments/ankh3.gin with the seed its gin files set (SEED); `ankh3@1`
trains the same experiment with SEED = 1, into OUT_DIR/ankh3-seed1. Two pre-trainings
of one objective measure the pre-training noise the objectives are weighed against.
"""
from typing import Optional, Sequence

from ankh3_jax.ablation import EXPERIMENTS

SEPARATOR = "@"


def parse(label: str) -> tuple:
  """(experiment, seed or None) of `label`; ValueError names what is wrong."""
  name, sep, seed = label.partition(SEPARATOR)
  if name not in EXPERIMENTS:
    raise ValueError(f"unknown experiment {name!r} in {label!r}; experiments are "
                     f"{', '.join(EXPERIMENTS)}, optionally with {SEPARATOR}SEED")
  if not sep:
    return name, None
  if not seed.isdigit():
    raise ValueError(f"{label!r}: the pre-training seed after {SEPARATOR!r} must be a "
                     "non-negative integer")
  return name, int(seed)


def experiment(label: str) -> str:
  return parse(label)[0]


def seed(label: str) -> Optional[int]:
  return parse(label)[1]


def directory(label: str) -> str:
  """The run's directory name under OUT_DIR ('ankh3', 'ankh3-seed1')."""
  name, run_seed = parse(label)
  return name if run_seed is None else f"{name}-seed{run_seed}"


def bindings(label: str) -> list:
  """The gin bindings that make this run differ from its experiment."""
  run_seed = seed(label)
  return [] if run_seed is None else [f"SEED={run_seed}"]


def ordered(labels: Sequence[str]) -> list:
  """`labels` in the experiments' report order, each experiment's seed runs after it."""
  key = lambda label: (EXPERIMENTS.index(experiment(label)), -1 if seed(label) is None
                       else seed(label))
  return sorted(labels, key=key)


def by_experiment(labels: Sequence[str]) -> dict:
  """{experiment: [its run labels]} in report order."""
  out = {}
  for label in ordered(labels):
    out.setdefault(experiment(label), []).append(label)
  return out
