"""seqio Tasks and Mixture for Ankh3 pre-training (installed as `ankh3_jax.tasks.pretrain`).

Registered on import with the defaults:
  ankh3_mlm_p15, ankh3_mlm_p20, ankh3_mlm_p30  MLM, one task per masking probability
  ankh3_mlm_sampled                              MLM, probability drawn per example
  ankh3_completion                               sequence completion
  ankh3_pretrain                                 mixture: MLM tasks share `mlm_rate`
                                                 evenly, completion gets `completion_rate`
Features "inputs" / "targets" (int32 ids, eos appended). Registration is idempotent: a
name registered with the same spec is skipped; one registered here with another spec
(new source, rates, ...) is replaced; one registered elsewhere is left alone.
"""
import functools
import logging
from typing import Optional, Sequence

import gin
import seqio

from ankh3_jax import vocab as vocab_lib
from ankh3_jax.data import preprocessors as prep
from ankh3_jax.data import sources

MLM_TASK_PREFIX = "ankh3_mlm_p"
MLM_SAMPLED_TASK = "ankh3_mlm_sampled"
COMPLETION_TASK = "ankh3_completion"
PRETRAIN_MIXTURE = "ankh3_pretrain"
DEFAULT_MLM_RATE = 0.5
DEFAULT_COMPLETION_RATE = 0.5

_SPEC_ATTR = "_ankh3_spec"


def mlm_task_name(probability: float) -> str:
  """`ankh3_mlm_p15` for 0.15; fractional percents use '_' (0.125 -> p12_5)."""
  percent = f"{probability * 100:.4f}".rstrip("0").rstrip(".")
  return MLM_TASK_PREFIX + percent.replace(".", "_")


def output_features(vocabulary=None):
  vocabulary = vocabulary or vocab_lib.get_vocabulary()
  return {name: seqio.Feature(vocabulary, add_eos=True, required=True)
          for name in ("inputs", "targets")}


def _describe(fn) -> str:
  if isinstance(fn, functools.partial):
    return f"{_describe(fn.func)}{sorted(fn.keywords.items())}"
  return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', repr(fn))}"


def _should_add(registry, name: str, spec) -> bool:
  """True if `name` must be (re-)added; removes a stale entry registered here."""
  if name not in registry.names():
    return True
  existing = getattr(registry.get(name), _SPEC_ATTR, None)
  if existing == spec:
    return False
  if existing is None:
    logging.warning("%s is registered outside ankh3_jax.tasks; left unchanged.", name)
    return False
  logging.info("Re-registering %s with a new spec.", name)
  registry.remove(name)
  return True


def _add_task(name: str, source, preprocessors, features, shuffle_buffer_size: int):
  spec = (repr(source), tuple(_describe(p) for p in preprocessors),
          str(features["inputs"].vocabulary), shuffle_buffer_size)
  if _should_add(seqio.TaskRegistry, name, spec):
    task = seqio.TaskRegistry.add(
        name, source=source, preprocessors=preprocessors, output_features=features,
        shuffle_buffer_size=shuffle_buffer_size)
    setattr(task, _SPEC_ATTR, spec)


def _add_mixture(name: str, rates):
  # seqio mixtures hold Task objects: re-register when any task was re-registered.
  spec = tuple((task, rate, getattr(seqio.TaskRegistry.get(task), _SPEC_ATTR, None))
               for task, rate in rates)
  if _should_add(seqio.MixtureRegistry, name, spec):
    mixture = seqio.MixtureRegistry.add(name, list(rates))
    setattr(mixture, _SPEC_ATTR, spec)


def mixture_rates(masking_probabilities: Sequence[float], mlm_rate: float,
                  completion_rate: float):
  """[(task, rate)]: `mlm_rate` split evenly over the MLM tasks, then completion."""
  rates = []
  if mlm_rate > 0:
    share = mlm_rate / len(masking_probabilities)
    rates += [(mlm_task_name(p), share) for p in masking_probabilities]
  if completion_rate > 0:
    rates.append((COMPLETION_TASK, completion_rate))
  if not rates:
    raise ValueError("mixture is empty: mlm_rate and completion_rate are both 0")
  return rates


@gin.configurable
def register_pretraining_tasks(
    masking_probabilities: Sequence[float] = prep.DEFAULT_MASKING_PROBABILITIES,
    mlm_rate: float = DEFAULT_MLM_RATE,
    completion_rate: float = DEFAULT_COMPLETION_RATE,
    mixture_or_task_name: str = PRETRAIN_MIXTURE,
    source: Optional[seqio.DataSource] = None,
    vocabulary_path: str = vocab_lib.VOCAB_PATH,
    shuffle_buffer_size: int = seqio.SHUFFLE_BUFFER_SIZE) -> str:
  """Registers the pre-training tasks (and mixture); returns the name to train on.

  Args:
    masking_probabilities: one MLM task per value, named `mlm_task_name(p)`; also the
      list `ankh3_mlm_sampled` draws from.
    mlm_rate: total mixture rate of the MLM tasks, split evenly between them.
    completion_rate: mixture rate of `ankh3_completion`.
    mixture_or_task_name: returned. If it names a registered task, no mixture is
      registered; otherwise a mixture of that name is registered with the rates.
    source: a seqio DataSource yielding {"id", "sequence"}; default the shipped
      corpus (`sources.FastaDataSource()`).
    vocabulary_path: SentencePiece model (e.g. a converted checkpoint's spiece.model).
    shuffle_buffer_size: the tasks' post-preprocessing shuffle buffer.
  """
  probabilities = tuple(float(p) for p in masking_probabilities)
  if not probabilities:
    raise ValueError("masking_probabilities is empty")
  source = source if source is not None else sources.FastaDataSource()
  features = output_features(vocab_lib.get_vocabulary(vocabulary_path))
  mlm_head = [prep.tokenize, prep.random_crop]
  tail = [seqio.preprocessors.append_eos_after_trim]
  for p in probabilities:
    _add_task(mlm_task_name(p), source,
              mlm_head + [functools.partial(prep.mask_residues, probability=p)] + tail,
              features, shuffle_buffer_size)
  _add_task(MLM_SAMPLED_TASK, source,
            mlm_head + [functools.partial(prep.mask_residues_sampled,
                                          probabilities=probabilities)] + tail,
            features, shuffle_buffer_size)
  _add_task(COMPLETION_TASK, source, [prep.tokenize, prep.complete_sequence], features,
            shuffle_buffer_size)
  if mixture_or_task_name not in seqio.TaskRegistry.names():
    if mixture_or_task_name.startswith(MLM_TASK_PREFIX):
      raise ValueError(f"{mixture_or_task_name} is not among the MLM tasks of "
                       f"masking_probabilities={probabilities}")
    _add_mixture(mixture_or_task_name,
                 mixture_rates(probabilities, mlm_rate, completion_rate))
  return mixture_or_task_name


register_pretraining_tasks()
