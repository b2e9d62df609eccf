"""seqio Tasks and Mixtures for Ankh3 pre-training (installed as `ankh3_jax.tasks.pretrain`).

A task family is every pre-training task over one data source, under one name prefix:
  <prefix>_mlm_p15, <prefix>_mlm_p20, <prefix>_mlm_p30  MLM, one task per probability
  <prefix>_mlm_sampled                                   MLM, probability drawn per example
  <prefix>_completion                                    sequence completion
  <prefix>_pretrain                                      mixture: MLM 1/6 each, completion 1/2
  <prefix>_mlm_multi                                     mixture: MLM 1/3 each
Importing this module registers the built-in family `ankh3` over the shipped corpus, once
(sources open files only when a dataset is requested). `register_fasta_pretraining`
registers the user's FASTA files under their own prefix; the gin entry points
`training_data` and `objective` pick the family and the task or mixture to train on.
Features "inputs" / "targets" (int32 ids, eos appended).
"""
import functools
import os
from typing import Mapping, Optional, Sequence, Tuple, Union

import gin
import seqio

from ankh3_jax import vocab as vocab_lib
from ankh3_jax.data import preprocessors as prep
from ankh3_jax.data import sources

BUILTIN_PREFIX = "ankh3"
USER_PREFIX = "user"
MLM_TASK_PREFIX = "ankh3_mlm_p"
MLM_SAMPLED_TASK = "ankh3_mlm_sampled"
COMPLETION_TASK = "ankh3_completion"
PRETRAIN_MIXTURE = "ankh3_pretrain"
MLM_MULTI_MIXTURE = "ankh3_mlm_multi"
# Presets too big to pre-train on the shipped demo corpus without being asked to.
LARGE_PRESETS = ("ankh_base", "ankh3_large", "ankh3_xl")

_FAMILY_ATTR = "_ankh3_family"  # the family spec, kept on each registered task/mixture

Rates = Sequence[Tuple[str, float]]
Paths = Union[str, Sequence[str]]


class RegistrationError(ValueError):
  """A prefix or mixture name is already registered with something else."""


class DemoCorpusError(ValueError):
  """A large preset would pre-train on the shipped demo corpus."""


def mlm_objective(probability: float) -> str:
  """`mlm_p15` for 0.15; fractional percents use '_' (0.125 -> mlm_p12_5)."""
  percent = f"{probability * 100:.4f}".rstrip("0").rstrip(".")
  return "mlm_p" + percent.replace(".", "_")


def mlm_task_name(probability: float, prefix: str = BUILTIN_PREFIX) -> str:
  """`ankh3_mlm_p15` for 0.15 (`<prefix>_mlm_p15` for another prefix)."""
  return f"{prefix}_{mlm_objective(probability)}"


def family_mixtures(masking_probabilities: Sequence[float]) -> dict:
  """{mixture suffix: [(task suffix, rate)]} of a family: the paper's 1:1 MLM/completion
  mixture ('pretrain', MLM sharing 0.5 evenly) and MLM only ('mlm_multi')."""
  mlm = [mlm_objective(p) for p in masking_probabilities]
  return {"pretrain": [(t, 0.5 / len(mlm)) for t in mlm] + [("completion", 0.5)],
          "mlm_multi": [(t, 1.0 / len(mlm)) for t in mlm]}


def _family_tasks(masking_probabilities: Sequence[float]) -> dict:
  """{task suffix: preprocessors} of a family."""
  mlm_head = [prep.tokenize, prep.random_crop]
  tail = [seqio.preprocessors.append_eos_after_trim]
  tasks = {mlm_objective(p): mlm_head + [functools.partial(prep.mask_residues,
                                                           probability=p)] + tail
           for p in masking_probabilities}
  tasks["mlm_sampled"] = mlm_head + [functools.partial(
      prep.mask_residues_sampled, probabilities=tuple(masking_probabilities))] + tail
  tasks["completion"] = [prep.tokenize, prep.complete_sequence]
  return tasks


def _registered(name: str):
  for registry in (seqio.TaskRegistry, seqio.MixtureRegistry):
    if name in registry.names():
      return registry.get(name)
  return None


def registered_family(prefix: str):
  """The spec `prefix` was registered with here, or None if it is not registered."""
  task = _registered(f"{prefix}_completion")
  return getattr(task, _FAMILY_ATTR, None) if task is not None else None


def register_task_family(
    prefix: str, source: seqio.DataSource, *, data_spec,
    masking_probabilities: Sequence[float] = prep.DEFAULT_MASKING_PROBABILITIES,
    vocabulary_path: str = vocab_lib.VOCAB_PATH,
    shuffle_buffer_size: int = seqio.SHUFFLE_BUFFER_SIZE) -> str:
  """Registers the tasks and mixtures of one family; returns `prefix`.

  `data_spec` describes the data (e.g. the expanded file lists): registering a prefix
  again with the same data and settings does nothing; with other ones it raises
  `RegistrationError` naming the prefix (the registered tasks are never replaced).
  """
  probabilities = tuple(float(p) for p in masking_probabilities)
  if not probabilities:
    raise ValueError("masking_probabilities is empty")
  spec = (data_spec, probabilities, os.path.abspath(vocabulary_path), shuffle_buffer_size)
  existing = registered_family(prefix)
  if existing == spec:
    return prefix
  tasks = _family_tasks(probabilities)
  mixtures = family_mixtures(probabilities)
  names = [f"{prefix}_{suffix}" for suffix in (*tasks, *mixtures)]
  if existing is not None or any(_registered(n) is not None for n in names):
    raise RegistrationError(
        f"task prefix {prefix!r} is already registered with other data or settings "
        f"({existing[0] if existing else 'by other code'}); choose another prefix")
  features = vocab_lib.output_features(vocab_lib.get_vocabulary(vocabulary_path))
  for suffix, preprocessors in tasks.items():
    task = seqio.TaskRegistry.add(
        f"{prefix}_{suffix}", source=source, preprocessors=preprocessors,
        output_features=features, shuffle_buffer_size=shuffle_buffer_size)
    setattr(task, _FAMILY_ATTR, spec)
  for suffix, rates in mixtures.items():
    mixture = seqio.MixtureRegistry.add(
        f"{prefix}_{suffix}", [(f"{prefix}_{t}", rate) for t, rate in rates])
    setattr(mixture, _FAMILY_ATTR, spec)
  return prefix


def register_fasta_pretraining(
    prefix: str, train: Paths, validation: Optional[Paths] = None,
    test: Optional[Paths] = None, *,
    masking_probabilities: Sequence[float] = prep.DEFAULT_MASKING_PROBABILITIES,
    max_length: Optional[int] = None, check_duplicates: bool = False,
    vocabulary_path: str = vocab_lib.VOCAB_PATH,
    shuffle_buffer_size: int = seqio.SHUFFLE_BUFFER_SIZE) -> str:
  """Registers a family over the user's FASTA files (paths, globs or lists of them;
  `gs://` works, files are read through `tf.io.gfile`); returns `prefix`.

  The globs are expanded here (a pattern matching nothing raises); the files are read
  only when a dataset is requested. Same prefix and same files again: no-op.
  """
  if prefix == BUILTIN_PREFIX:
    raise RegistrationError(f"prefix {BUILTIN_PREFIX!r} is the built-in family; "
                            "choose another prefix for your data")
  split_paths = {s: p for s, p in (("train", train), ("validation", validation),
                                   ("test", test)) if p is not None}
  source = sources.FastaDataSource(split_paths, max_length=max_length,
                                   check_duplicates=check_duplicates)
  data_spec = ("fasta", tuple(sorted(source.split_paths.items())), max_length,
               check_duplicates)
  return register_task_family(prefix, source, data_spec=data_spec,
                              masking_probabilities=masking_probabilities,
                              vocabulary_path=vocabulary_path,
                              shuffle_buffer_size=shuffle_buffer_size)


def register_tfds_pretraining(
    prefix: str, data_dir: Optional[str] = None, name: str = "ankh3_uniref50:1.0.0", *,
    masking_probabilities: Sequence[float] = prep.DEFAULT_MASKING_PROBABILITIES) -> str:
  """Registers a family over the prepared TFDS `ankh3_uniref50` data set."""
  source = sources.uniref50_tfds_source(name=name, data_dir=data_dir)
  return register_task_family(prefix, source, data_spec=("tfds", name, data_dir),
                              masking_probabilities=masking_probabilities)


def _preset_name(model_config) -> Optional[str]:
  """Name of the size preset `model_config` has the dimensions of, if any."""
  from ankh3_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  for name, dims in config_lib.PRESETS.items():
    if all(getattr(model_config, k) == v for k, v in dims.items()):
      return name
  return None


@gin.configurable
def training_data(train_fasta: Optional[Paths] = None,
                  validation_fasta: Optional[Paths] = None,
                  test_fasta: Optional[Paths] = None,
                  tfds_data_dir: Optional[str] = None,
                  prefix: str = USER_PREFIX,
                  masking_probabilities: Sequence[float] = (
                      prep.DEFAULT_MASKING_PROBABILITIES),
                  model_config=None, allow_demo_corpus: bool = True) -> str:
  """The task family to train on (gin: TRAIN_FASTA, VALIDATION_FASTA, TFDS_DATA_DIR).

  The user's FASTA files or TFDS data dir are registered under `prefix`; with neither,
  the built-in `ankh3` family (shipped demo corpus), unless `masking_probabilities`
  differ from its own (then the corpus is registered again under `prefix`). A large
  `model_config` (LARGE_PRESETS) on the demo corpus raises `DemoCorpusError` unless
  `allow_demo_corpus`.
  """
  if train_fasta is not None and tfds_data_dir is not None:
    raise ValueError("give TRAIN_FASTA or TFDS_DATA_DIR, not both")
  if train_fasta is not None:
    if validation_fasta is None:
      raise ValueError(f"TRAIN_FASTA={train_fasta!r} needs VALIDATION_FASTA too (the "
                       "trainer evaluates on the validation split)")
    return register_fasta_pretraining(prefix, train_fasta, validation_fasta, test_fasta,
                                      masking_probabilities=masking_probabilities)
  if validation_fasta is not None:
    raise ValueError("VALIDATION_FASTA is set but TRAIN_FASTA is not")
  if tfds_data_dir is not None:
    return register_tfds_pretraining(prefix, tfds_data_dir,
                                     masking_probabilities=masking_probabilities)
  preset = _preset_name(model_config) if model_config is not None else None
  if preset in LARGE_PRESETS and not allow_demo_corpus:
    raise DemoCorpusError(
        f"refusing to pre-train {preset} on the shipped demo corpus (8,000 sequences). "
        "Pass your data: --gin.TRAIN_FASTA=\"'gs://bucket/train*.fasta.gz'\" "
        "--gin.VALIDATION_FASTA=\"'gs://bucket/valid.fasta'\" (or "
        "--gin.TFDS_DATA_DIR=\"'gs://bucket/tfds'\"; launch/tpu_pod.sh --data), or "
        "--gin.ALLOW_DEMO_CORPUS=True to use the demo corpus anyway")
  probabilities = tuple(float(p) for p in masking_probabilities)
  if probabilities == tuple(prep.DEFAULT_MASKING_PROBABILITIES):
    return BUILTIN_PREFIX
  source = sources.FastaDataSource()
  return register_task_family(
      prefix, source, data_spec=("fasta", tuple(sorted(source.split_paths.items())),
                                 None, False),
      masking_probabilities=probabilities)


@gin.configurable
def objective(name: str = "pretrain", rates: Optional[Rates] = None,
              family: str = BUILTIN_PREFIX) -> str:
  """The task or mixture `<family>_<name>` to train on; returns its name.

  `rates`: [(task suffix, rate)] registers the mixture `<family>_<name>` of those tasks
  (e.g. name='mlm_completion', rates=[('mlm_sampled', 1), ('completion', 1)]): a new
  objective is a gin edit. Without `rates`, `<family>_<name>` must be registered.
  """
  full_name = f"{family}_{name}"
  if rates is not None:
    return register_mixture(full_name, [(f"{family}_{t}", r) for t, r in rates])
  if _registered(full_name) is None:
    known = sorted(n[len(family) + 1:] for n in (*seqio.TaskRegistry.names(),
                                                  *seqio.MixtureRegistry.names())
                   if n.startswith(family + "_"))
    raise ValueError(f"no task or mixture {full_name!r}; {family!r} has {known}")
  return full_name


def register_mixture(name: str, rates: Rates) -> str:
  """Registers mixture `name` of [(task, rate)] once; same rates again: no-op."""
  rates = [(str(t), float(r)) for t, r in rates]
  if not rates or any(r < 0 for _, r in rates) or sum(r for _, r in rates) <= 0:
    raise ValueError(f"mixture {name!r}: rates must be >= 0 with a positive sum, "
                     f"got {rates}")
  for task, _ in rates:
    if task not in seqio.TaskRegistry.names():
      raise ValueError(f"mixture {name!r}: no task {task!r}")
  existing = _registered(name)
  if existing is not None:
    if dict(getattr(existing, "rate_per_task_name", {})) == dict(rates):
      return name
    raise RegistrationError(f"mixture {name!r} is already registered with other rates "
                            f"or as a task; choose another name")
  seqio.MixtureRegistry.add(name, rates)
  return name


def task_rates(name: str) -> Mapping[str, float]:
  """{task: share} of a registered mixture (shares sum to 1), or {name: 1.0} for a task."""
  provider = seqio.get_mixture_or_task(name)
  rates = dict(getattr(provider, "rate_per_task_name", {name: 1.0}))
  total = sum(rates.values())
  return {task: rate / total for task, rate in rates.items()}


register_task_family(
    BUILTIN_PREFIX, sources.FastaDataSource(),
    data_spec=("fasta", "shipped corpus"))
