"""The pre-training loop: sharded state, train/eval steps, checkpoints, summaries.

`train()` (gin-configurable) is what `ankh3-train` runs. One step consumes one global
batch; the state's `step` is therefore also the data position, saved with every
checkpoint. Metrics of step N are fetched while step N+1 runs, so the host never
stalls the device for logging.
"""
import dataclasses
import logging
import os
import sys
import time
from typing import Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ankh3_jax import config as config_lib
from ankh3_jax import model as model_lib
from ankh3_jax import partitioning
from ankh3_jax.training import checkpoints as checkpoints_lib
from ankh3_jax.training import data_source as data_source_lib
from ankh3_jax.training import losses
from ankh3_jax.training import metrics as metrics_lib
from ankh3_jax.training import optimizers
from ankh3_jax.training import preemption
from ankh3_jax.training import residue_eval
from ankh3_jax.training import run_lock
from ankh3_jax.training import run_settings
from ankh3_jax.training import seqio_data
from ankh3_jax.training import state as state_lib
from ankh3_jax.training import steps

COMPLETED, PREEMPTED = "completed", "preempted"
RESIDUE_STATS_FILE = "residue_baselines.json"  # in MODEL_DIR


class NonFiniteLossError(RuntimeError):
  """Raised with nan_policy='stop'; `step` is the 1-based step whose update was dropped."""

  def __init__(self, step: int):
    self.step = step
    super().__init__(f"non-finite loss or gradient at step {step}; stopping "
                     "(nan_policy='stop'). The update of that step was not applied.")


class ConfigurationError(ValueError):
  """A train() argument or a configurable it builds is wrong (found before any write)."""


@dataclasses.dataclass
class TrainResult:
  status: str                 # COMPLETED or PREEMPTED
  step: int                   # steps taken when the run ended
  losses: dict                # step -> train loss of the steps run by this call
  nonfinite_steps: list       # steps whose update was skipped
  summary: Optional[dict]     # first vs last validation per task (see metrics.summarize)
  model_dir: str = ""


class Trainer:
  """Owns the mesh, the jitted steps and the state layout for one model and data source."""

  def __init__(self, model_config: config_lib.T5Config,
               data_source: data_source_lib.DataSource, batch_size: int,
               train_steps: int, num_microbatches: int = 1, seed: int = 0,
               nan_policy: str = "skip", mesh: Optional[Mesh] = None,
               rules: Optional[partitioning.LogicalRules] = None,
               loss_config: losses.LossConfig = losses.LossConfig(),
               optimizer: optimizers.OptimizerFactory = optimizers.adafactor):
    self.config = model_config
    self.data = data_source
    self.batch_size = batch_size
    self.seed = seed
    self.nan_policy = nan_policy
    self.mesh = mesh if mesh is not None else partitioning.create_mesh()
    self.rules = tuple(rules if rules is not None
                       else partitioning.standard_logical_axis_rules(self.mesh.axis_names))
    self.layout = partitioning.data_layout(self.mesh, self.rules, batch_size)
    if (self.layout.shard_batch_size % num_microbatches
        or batch_size % num_microbatches):
      raise ValueError(f"batch size {batch_size} (per data shard "
                       f"{self.layout.shard_batch_size}) is not divisible by "
                       f"num_microbatches={num_microbatches}")
    self.model = model_lib.Transformer(model_config)
    self.schedule = optimizers.make_schedule(default_decay_steps=train_steps)
    self.tx = optimizer(self.schedule)
    self.factory = state_lib.StateFactory(self.model, self.tx, data_source.feature_lengths)
    self.state_shardings = self.factory.shardings(self.mesh, self.rules)
    replicated = NamedSharding(self.mesh, P())
    train_step = steps.make_train_step(
        self.model, self.tx, loss_config, self.schedule,
        num_microbatches=num_microbatches, nan_policy=nan_policy,
        enable_dropout=model_config.dropout_rate > 0)
    dropout_key = lambda: jax.random.fold_in(jax.random.key(seed), 1)
    self._train_step = jax.jit(
        lambda state, batch: train_step(state, batch, dropout_key()),
        in_shardings=(self.state_shardings, None),
        out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    self._eval_step = jax.jit(steps.make_eval_step(self.model),
                              in_shardings=(self.state_shardings.params, None),
                              out_shardings=replicated)

  def context(self):
    """Mesh and logical-axis-rule context for tracing and running the steps."""
    return _Context(self.mesh, self.rules)

  def data_info(self, step: int) -> dict:
    return {"batches_consumed": int(step), "global_batch_size": self.batch_size,
            "num_data_shards": self.layout.num_shards, **self.data.describe()}

  def init_state(self):
    return self.factory.create(jax.random.fold_in(jax.random.key(self.seed), 0),
                               self.mesh, self.rules)

  def abstract_state(self):
    return self.factory.abstract_sharded_state(self.mesh, self.rules)

  def global_batch(self, local_batch: dict) -> dict:
    return partitioning.to_global_batch(local_batch, self.mesh, self.rules, self.batch_size)

  def train_step(self, state, global_batch):
    return self._train_step(state, global_batch)

  def eval_sets(self, stats_path: Optional[str] = None) -> dict:
    """Per-task eval batches (host-local rows), equal in number on every process.

    Where the data source offers `residue_stats` (see residue_eval), each batch is
    annotated with the baselines' per-token scores; the stats are stored in (or read
    from) the JSON file `stats_path`.
    """
    sets = {}
    for task in self.data.eval_task_names():
      batches = self.data.eval_batches(task, self.layout)
      stats = None
      if hasattr(self.data, "residue_stats"):  # data_source.ResidueStats
        stats = self.data.residue_stats(task, stats_path)
      if stats is not None:
        batches = [residue_eval.annotate_batch(b, stats, self.config.vocab_size)
                   for b in batches]
      count = len(batches)
      if jax.process_count() > 1:
        count = int(np.max(multihost_utils.process_allgather(np.int32(count))))
      if count > len(batches):
        if not batches:
          raise ValueError(f"eval task {task}: this process has no validation data while "
                           "others have some; use host_mode='slice' or a larger split")
        empty = {k: np.zeros_like(v) for k, v in batches[0].items()}
        batches = batches + [empty] * (count - len(batches))
      sets[task] = batches
    return sets

  def evaluate(self, params, eval_sets: dict) -> dict:
    """{task/loss, task/accuracy, task/tokens} (all target tokens) over each task's eval
    batches, plus the residue metrics of annotated batches (`task/residue_loss`, ...;
    see residue_eval.ResidueAccumulator)."""
    out = {}
    for task, batches in eval_sets.items():
      tokens, residues = metrics_lib.EvalAccumulator(), residue_eval.ResidueAccumulator()
      for batch in batches:
        sums = jax.device_get(self._eval_step(params, self.global_batch(batch)))
        per_example = sums.pop("per_example", None)
        tokens.add(sums)
        if per_example is not None:
          residues.add(per_example)
      out.update({f"{task}/{k}": v for k, v in tokens.result().items()})
      out.update({f"{task}/{k}": v for k, v in residues.result().items()})
    return out


class _Context:

  def __init__(self, mesh, rules):
    self._mesh_cm = jax.set_mesh(mesh)
    self._rules_cm = nn.logical_axis_rules(rules)

  def __enter__(self):
    self._mesh_cm.__enter__()
    self._rules_cm.__enter__()
    return self

  def __exit__(self, *exc):
    self._rules_cm.__exit__(*exc)
    self._mesh_cm.__exit__(*exc)
    return False


def _check_data_info(saved: dict, current: dict) -> None:
  keys = [k for k in current if k != "batches_consumed"]
  diff = {k: (saved.get(k), current[k]) for k in keys if saved.get(k) != current[k]}
  if diff:
    logging.warning("resuming with a different data stream than the checkpoint's %s: "
                    "the data position is not exact", diff)


def _host_params(params):
  """Full parameter values as numpy on every process (gathered leaf by leaf)."""
  if jax.process_count() == 1:
    return jax.device_get(params)
  return jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), params)


def export_model(model_dir: str, config: config_lib.T5Config, params,
                 run_id: Optional[str] = None, step: int = 0) -> Optional[str]:
  """Writes MODEL_DIR/model with `model_io.save_model` (process 0); returns its path.

  With `run_id` (train's runs), an existing MODEL_DIR/model is replaced only if it is
  an export of that run, and the new one is marked as such.
  """
  try:
    from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("ankh3_jax.model_io is not available: final model not exported")
    return None
  host = _host_params(params)
  path = os.path.join(model_dir, "model")

  def save():
    if run_id is None:
      model_io.save_model(path, config, host)
    else:
      run_settings.check_export_target(path, run_id)
      with model_io.atomic_directory(path) as tmp:
        model_io.save_model(tmp, config, host)
        run_settings.write_export_marker(tmp, run_id, step)

  # Process 0 writes; its outcome is broadcast (the other processes wait for it, and
  # raise too if it failed, instead of waiting forever at a barrier).
  _on_process_0(save, (run_settings.RunSettingsError, OSError), "exporting the model")
  return path


def _on_process_0(fn, error_types: tuple, what: str):
  """fn() on process 0; if it raised one of `error_types`, every process raises."""
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fn()
    except error_types as e:
      error = e
  if jax.process_count() > 1:
    code = 0 if error is None else 1 + next(
        i for i, t in enumerate(error_types) if isinstance(error, t))
    code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
    if code and error is None:
      raise error_types[code - 1](f"{what} failed on process 0 (see its message)")
  if error is not None:
    raise error
  return result


def _has_checkpoints(checkpoint_dir: str) -> bool:
  return os.path.isdir(checkpoint_dir) and any(n.isdigit() for n in os.listdir(checkpoint_dir))


class _Progress:
  """tqdm bar (process 0) showing loss and tokens/s; also logs train scalars."""

  def __init__(self, show_bar: bool, is_main: bool, total: int, initial: int):
    self.bar = None
    self.is_main = is_main
    if show_bar and is_main:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                      dynamic_ncols=True, file=sys.stderr)
    self.last_time = time.time()

  def start_at(self, step: int) -> None:
    if self.bar is not None:
      self.bar.n = self.bar.last_print_n = step
      self.bar.refresh()
    self.last_time = time.time()

  def tokens_per_second(self, tokens: float) -> float:
    now = time.time()
    rate = tokens / max(now - self.last_time, 1e-9)
    self.last_time = now
    return rate

  def update(self, loss: float, rate: float) -> None:
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
      self.bar.update(1)

  def write(self, text: str) -> None:
    if self.bar is not None:
      self.bar.write(text, file=sys.stderr)
    elif self.is_main:
      print(text, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class _TrainLoop:
  """One call of `train`: restore or init, the step loop, eval, checkpoints, summaries."""

  def __init__(self, trainer: Trainer, model_dir: str, train_steps: int, nan_policy: str,
               log_every: int, eval_every: int, checkpointer, writer, progress):
    self.trainer = trainer
    self.model_dir = model_dir
    self.train_steps = train_steps
    self.nan_policy = nan_policy
    self.log_every = log_every
    self.eval_every = eval_every
    self.ckpt = checkpointer
    self.writer = writer
    self.progress = progress
    self.result = TrainResult(COMPLETED, 0, {}, [], None, model_dir)
    self.eval_sets = {}
    self.last_eval = None
    self._interval = []

  def initial_state(self, initial_params=None):
    """Newest intact checkpoint (data position included), else a fresh sharded init."""
    trainer = self.trainer
    restored = self.ckpt.restore_latest_good(trainer.abstract_state())
    if restored is not None:
      state, saved_info = restored
      _check_data_info(saved_info, trainer.data_info(int(state.step)))
      return state
    state = trainer.init_state()
    if initial_params is not None:
      state = state.replace(params=initial_params)
    return state

  def evaluate(self, step: int, params) -> None:
    scores = self.trainer.evaluate(params, self.eval_sets)
    self.writer.write("eval", step, scores)
    self.progress.write(f"eval @ step {step}: {metrics_lib.format_eval_line(scores)}")
    self.last_eval = step

  def finish_step(self, step: int, metrics) -> None:
    """Host side of a finished step: NaN guard, progress bar, train summaries."""
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    self.result.losses[step] = metrics["loss"]
    if metrics["nonfinite"]:
      self.result.nonfinite_steps.append(step)
      action = "applied anyway" if self.nan_policy == "none" else "update skipped"
      self.progress.write(f"non-finite loss/gradient at step {step}: {action} "
                          f"(nan_policy={self.nan_policy!r})")
      if self.nan_policy == "stop":
        raise NonFiniteLossError(step)
    rate = self.progress.tokens_per_second(metrics["input_tokens"] + metrics["target_tokens"])
    metrics["tokens_per_second"] = rate
    self.progress.update(metrics["cross_entropy"], rate)
    self._interval.append(metrics)
    if step % self.log_every == 0 or step == self.train_steps:
      mean = {k: float(np.mean([m[k] for m in self._interval])) for k in self._interval[0]}
      mean["nonfinite_steps"] = float(sum(m["nonfinite"] for m in self._interval))
      mean.pop("nonfinite")  # `input_tokens`, `target_tokens`: non-padding, per step
      self.writer.write("train", step, mean)
      self._interval.clear()

  def run(self, state, eval_at_start: bool):
    """Steps until train_steps or pre-emption; returns the final state."""
    trainer, step = self.trainer, int(state.step)
    logging.info("mesh %s, data layout %s, starting at step %d of %d",
                 dict(trainer.mesh.shape), trainer.layout, step, self.train_steps)
    if self.eval_every:
      self.eval_sets = trainer.eval_sets(os.path.join(self.model_dir, RESIDUE_STATS_FILE))
    if self.eval_sets and eval_at_start and step == 0:
      self.evaluate(0, state.params)
    batches, pending = None, None
    try:
      with preemption.PreemptionWatcher() as watcher:
        if step < self.train_steps:
          batches = trainer.data.train_batches(trainer.layout, start_batch=step)
        while step < self.train_steps:
          state, metrics = trainer.train_step(state, trainer.global_batch(next(batches)))
          if pending is not None:  # step N's metrics are read while step N+1 runs
            self.finish_step(*pending)
          step += 1
          pending = (step, metrics)
          if step % self.ckpt.save_every == 0 and step < self.train_steps:
            self.ckpt.save(step, state, trainer.data_info(step))
          if self.eval_sets and step % self.eval_every == 0:
            self.finish_step(*pending)
            pending = None
            self.evaluate(step, state.params)
          if watcher.should_stop(step):
            self.result.status = PREEMPTED
            break
        if pending is not None:
          self.finish_step(*pending)
    finally:
      if batches is not None:
        batches.close()
    self.result.step = step
    if self.ckpt.latest_step() != step:
      self.ckpt.save(step, state, trainer.data_info(step), force=True)
    if self.result.status == PREEMPTED:
      self.ckpt.wait()
      self.progress.write(f"pre-empted: checkpoint saved at step {step}")
    elif self.eval_sets and self.last_eval != step:
      self.evaluate(step, state.params)
    self.ckpt.wait()
    return state


@gin.configurable(denylist=["mesh", "rules"])
def train(model_dir: str = gin.REQUIRED,
          model_config: config_lib.T5Config = gin.REQUIRED,
          data_source: data_source_lib.DataSource = gin.REQUIRED,
          batch_size: int = gin.REQUIRED,
          train_steps: int = gin.REQUIRED,
          loss_config: losses.LossConfig = losses.LossConfig(),
          optimizer: optimizers.OptimizerFactory = optimizers.adafactor,
          num_microbatches: int = 1,
          seed: int = 0,
          nan_policy: str = "skip",
          log_every: int = 10,
          eval_every: int = 1000,
          checkpoint_every: int = 1000,
          keep_checkpoints: Optional[int] = 3,
          async_checkpoints: bool = True,
          eval_at_start: bool = True,
          progress_bar: bool = True,
          export: bool = True,
          init_from: Optional[str] = None,
          allow_changed: Sequence[str] = (),
          mesh: Optional[Mesh] = None,
          rules=None) -> TrainResult:
  """Trains (or resumes) a model in `model_dir`; see docs/training.md.

  Args:
    model_dir: checkpoints, summaries, the eval summary and the exported model go here.
    model_config: e.g. `@preset()` from gin_configs/models/*.gin.
    data_source: `@SeqioSource()` (or `@SyntheticSource()` for smoke tests): a
      `data_source.DataSource`.
    batch_size: global batch size (examples / packed rows per step, all processes).
    train_steps: total steps; a resumed run continues up to this count.
    loss_config: the loss (gin: `@ankh3_jax.training.losses.LossConfig()`).
    optimizer: a factory `schedule -> optax transformation` (gin: e.g.
      `@ankh3_jax.training.optimizers.adafactor`, see optimizers.py); the schedule is
      `make_schedule`'s, decaying over `train_steps` unless told otherwise.
    num_microbatches: gradient accumulation: the batch is split into this many parts.
    seed: parameter-init and dropout seed (the data seed is the source's).
    nan_policy: 'skip' (drop the update, report the step), 'stop' (raise
      NonFiniteLossError), 'none' (apply it anyway).
    log_every / checkpoint_every: intervals in steps.
    eval_every: steps between per-task validations (0: no validation).
    keep_checkpoints: checkpoints kept (None: all).
    async_checkpoints: save in the background.
    eval_at_start: evaluate before the first step of a fresh run.
    progress_bar: show the tqdm bar (process 0).
    export: write MODEL_DIR/model with model_io.save_model at the end.
    init_from: a model_io export to take initial parameters from (fine-tuning); ignored
      when MODEL_DIR already has a checkpoint.
    allow_changed: settings that may differ from MODEL_DIR/run_settings.json on resume
      (e.g. ['train_steps', 'peak_learning_rate']; see run_settings.py).
    mesh, rules: override gin's `create_mesh` / `standard_logical_axis_rules`.
  """
  try:  # configuration, before anything is written
    _check_positive_ints(batch_size=batch_size, train_steps=train_steps,
                         num_microbatches=num_microbatches, log_every=log_every,
                         checkpoint_every=checkpoint_every)
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
      raise ValueError(f"eval_every must be an integer >= 0, got {eval_every!r}")
    if not run_lock.is_local_path(str(model_dir)):
      raise ValueError(
          f"MODEL_DIR {model_dir!r} is a URL: the metrics, the run record and the export "
          "are written with local file operations and would land in a local directory "
          "of this machine, lost with it. Mount the bucket and pass the mounted path "
          "(e.g. gcsfuse --implicit-dirs BUCKET /mnt/gcs/BUCKET; launch/tpu_pod.sh does "
          "this for a gs:// --model_dir)")
    if not isinstance(model_config, config_lib.T5Config):
      raise ValueError("model_config must be a T5Config (e.g. @preset()), got "
                       f"{model_config!r}")
    missing = data_source_lib.missing_members(data_source)
    if missing:
      raise ValueError(f"data_source lacks {missing} (see data_source.DataSource): "
                       f"{data_source!r}")
    if not isinstance(loss_config, losses.LossConfig):
      raise ValueError("loss_config must be a LossConfig (e.g. @LossConfig()), got "
                       f"{loss_config!r}")
    if not callable(optimizer):
      raise ValueError("optimizer must be a factory schedule -> optax transformation "
                       f"(e.g. @ankh3_jax.training.optimizers.adafactor), got {optimizer!r}")
    if isinstance(allow_changed, str):
      allow_changed = [n for n in allow_changed.split(",") if n]
    trainer = Trainer(model_config, data_source, batch_size, train_steps,
                      num_microbatches, seed, nan_policy, mesh, rules,
                      loss_config=loss_config, optimizer=optimizer)
    if hasattr(data_source, "check_inputs"):  # data_source.CheckedInputs
      data_source.check_inputs(evaluate=eval_every > 0)  # missing files: before any write
  except seqio_data.DataInputError:
    raise
  except ValueError as e:
    raise ConfigurationError(str(e)) from e
  settings = run_settings.current_settings(
      model_config, data_source,
      {"batch_size": batch_size, "train_steps": train_steps,
       "num_microbatches": num_microbatches, "seed": seed, "nan_policy": nan_policy})
  os.makedirs(model_dir, exist_ok=True)
  lock = run_lock.RunLock(model_dir)
  _on_process_0(lock.acquire, (run_lock.RunLockHeld, OSError), "locking MODEL_DIR")
  try:
    return _train_locked(trainer, settings, model_dir, train_steps, nan_policy, log_every,
                         eval_every, checkpoint_every, keep_checkpoints,
                         async_checkpoints, eval_at_start, progress_bar, export,
                         init_from, allow_changed)
  finally:
    lock.release()


def _train_locked(trainer: Trainer, settings: dict, model_dir: str, train_steps: int,
                  nan_policy: str, log_every: int, eval_every: int, checkpoint_every: int,
                  keep_checkpoints: Optional[int], async_checkpoints: bool,
                  eval_at_start: bool, progress_bar: bool, export: bool,
                  init_from: Optional[str], allow_changed: Sequence[str]) -> TrainResult:
  """`train` once MODEL_DIR is locked: the run record, the loop, the export."""
  is_main = jax.process_index() == 0
  checkpoint_dir = os.path.join(model_dir, "checkpoints")

  def check_run_dir():  # both checks before the record is written
    record = run_settings.check_and_record(model_dir, settings,
                                           _has_checkpoints(checkpoint_dir),
                                           allow_changed, write=False)
    if export:
      run_settings.check_export_target(os.path.join(model_dir, "model"), record["run_id"])
    run_settings.write_record(model_dir, record)
    return record["run_id"]

  run_id = _on_process_0(check_run_dir, (run_settings.RunSettingsError, OSError),
                         "checking MODEL_DIR's run record")
  ckpt = checkpoints_lib.Checkpointer(checkpoint_dir, save_every=checkpoint_every,
                                      keep=keep_checkpoints, async_save=async_checkpoints)
  initial_params = None
  if init_from and ckpt.latest_step() is None:
    initial_params = _load_initial_params(init_from, trainer)
  writer = metrics_lib.MetricsWriter(model_dir, enabled=is_main)
  progress = _Progress(progress_bar, is_main, train_steps, 0)
  loop = _TrainLoop(trainer, model_dir, train_steps, nan_policy, log_every, eval_every,
                    ckpt, writer, progress)
  try:
    with trainer.context():
      state = loop.initial_state(initial_params)
      progress.start_at(int(state.step))
      state = loop.run(state, eval_at_start)
  finally:
    progress.close()
    ckpt.close()
    writer.close()
  result = loop.result
  if export and result.status == COMPLETED:
    # Outside the mesh context: model_io traces the model without logical axis rules.
    path = export_model(model_dir, trainer.config, state.params, run_id, result.step)
    if path:
      progress.write(f"final model exported to {path}")
  if is_main and loop.eval_sets:
    result.summary = metrics_lib.summarize(model_dir, list(loop.eval_sets))
    if result.summary:
      metrics_lib.write_summary(model_dir, result.summary)
  return result


def _check_positive_ints(**values) -> None:
  for name, value in values.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _load_initial_params(path: str, trainer: Trainer):
  """Parameters of a model_io export, placed in the run's parameter shardings.

  Called outside the mesh context (model_io traces the model without axis rules).
  """
  from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top
  config, params, _ = model_io.load_model(path)
  run_only = ("dtype", "param_dtype", "remat_policy", "scan_layers", "dropout_rate",
              "attention_impl")
  arch = lambda c: {k: v for k, v in config_lib.config_to_dict(c).items() if k not in run_only}
  if arch(config) != arch(trainer.config):
    diff = {k: (v, arch(trainer.config)[k]) for k, v in arch(config).items()
            if arch(trainer.config)[k] != v}
    raise ValueError(f"init_from {path}: its architecture differs from model_config "
                     f"(saved, run): {diff}")
  params = model_io.layout_for(params, trainer.config)

  def place(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  logging.info("initial parameters loaded from %s", path)
  return jax.tree.map(place, params, trainer.state_shardings.params)
