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
from typing import Any, Optional

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
from ankh3_jax.training import losses
from ankh3_jax.training import metrics as metrics_lib
from ankh3_jax.training import optimizers
from ankh3_jax.training import preemption
from ankh3_jax.training import state as state_lib
from ankh3_jax.training import steps

COMPLETED, PREEMPTED = "completed", "preempted"


class NonFiniteLossError(RuntimeError):
  """Raised with nan_policy='stop'; `step` is the 1-based step whose update was dropped."""

  def __init__(self, step: int):
    self.step = step
    super().__init__(f"non-finite loss or gradient at step {step}; stopping "
                     "(nan_policy='stop'). The update of that step was not applied.")


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

  def __init__(self, model_config: config_lib.T5Config, data_source: Any, batch_size: int,
               train_steps: int, num_microbatches: int = 1, seed: int = 0,
               nan_policy: str = "skip", mesh: Optional[Mesh] = None,
               rules: Optional[partitioning.LogicalRules] = None,
               loss_config: Optional[losses.LossConfig] = None):
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
    self.tx = optimizers.make_optimizer(self.schedule)
    self.factory = state_lib.StateFactory(self.model, self.tx, data_source.feature_lengths)
    self.state_shardings = self.factory.shardings(self.mesh, self.rules)
    replicated = NamedSharding(self.mesh, P())
    train_step = steps.make_train_step(
        self.model, self.tx, loss_config or losses.LossConfig(), self.schedule,
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

  def eval_sets(self) -> dict:
    """Per-task eval batches (host-local rows), equal in number on every process."""
    sets = {}
    for task in self.data.eval_task_names():
      batches = self.data.eval_batches(task, self.layout)
      count = len(batches)
      if jax.process_count() > 1:
        count = int(np.max(multihost_utils.process_allgather(np.int32(count))))
      if batches and count > len(batches):
        empty = {k: np.zeros_like(v) for k, v in batches[0].items()}
        batches = batches + [empty] * (count - len(batches))
      sets[task] = batches
    return sets

  def evaluate(self, params, eval_sets: dict) -> dict:
    """{task/loss, task/accuracy, task/tokens} over each task's eval batches."""
    out = {}
    for task, batches in eval_sets.items():
      acc = metrics_lib.EvalAccumulator()
      for batch in batches:
        acc.add(jax.device_get(self._eval_step(params, self.global_batch(batch))))
      out.update({f"{task}/{k}": v for k, v in acc.result().items()})
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


def export_model(model_dir: str, config: config_lib.T5Config, params) -> Optional[str]:
  """Writes MODEL_DIR/model with `model_io.save_model` (process 0); returns its path."""
  try:
    from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("ankh3_jax.model_io is not available: final model not exported")
    return None
  host = _host_params(params)
  path = os.path.join(model_dir, "model")
  if jax.process_index() == 0:
    model_io.save_model(path, config, host)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("ankh3_export_model")
  return path


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


@gin.configurable(denylist=["mesh", "rules"])
def train(model_dir: str = gin.REQUIRED,
          model_config: config_lib.T5Config = gin.REQUIRED,
          data_source: Any = gin.REQUIRED,
          batch_size: int = gin.REQUIRED,
          train_steps: int = gin.REQUIRED,
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
          mesh: Optional[Mesh] = None,
          rules=None) -> TrainResult:
  """Trains (or resumes) a model in `model_dir`; see docs/training.md.

  Args:
    model_dir: checkpoints, summaries, the eval summary and the exported model go here.
    model_config: e.g. `@preset()` from gin_configs/models/*.gin.
    data_source: `@SeqioSource()` (or `@SyntheticSource()` for smoke tests).
    batch_size: global batch size (examples / packed rows per step, all processes).
    train_steps: total steps; a resumed run continues up to this count.
    num_microbatches: gradient accumulation: the batch is split into this many parts.
    seed: parameter-init and dropout seed (the data seed is the source's).
    nan_policy: 'skip' (drop the update, report the step), 'stop' (raise
      NonFiniteLossError), 'none' (apply it anyway).
    log_every / eval_every / checkpoint_every: intervals in steps.
    keep_checkpoints: checkpoints kept (None: all).
    async_checkpoints: save in the background.
    eval_at_start: evaluate before the first step of a fresh run.
    progress_bar: show the tqdm bar (process 0).
    export: write MODEL_DIR/model with model_io.save_model at the end.
    init_from: a model_io export to take initial parameters from (fine-tuning); ignored
      when MODEL_DIR already has a checkpoint.
    mesh, rules: override gin's `create_mesh` / `standard_logical_axis_rules`.
  """
  _check_positive_ints(batch_size=batch_size, train_steps=train_steps,
                       num_microbatches=num_microbatches, log_every=log_every,
                       checkpoint_every=checkpoint_every)
  if not isinstance(model_config, config_lib.T5Config):
    raise ValueError(f"model_config must be a T5Config (e.g. @preset()), got {model_config!r}")
  trainer = Trainer(model_config, data_source, batch_size, train_steps, num_microbatches,
                    seed, nan_policy, mesh, rules)
  is_main = jax.process_index() == 0
  os.makedirs(model_dir, exist_ok=True)
  ckpt = checkpoints_lib.Checkpointer(os.path.join(model_dir, "checkpoints"),
                                      save_every=checkpoint_every, keep=keep_checkpoints,
                                      async_save=async_checkpoints)
  writer = metrics_lib.MetricsWriter(model_dir, enabled=is_main)
  result = TrainResult(COMPLETED, 0, {}, [], None, model_dir)
  with trainer.context():
    if ckpt.latest_step() is not None:
      state, saved_info = ckpt.restore(trainer.abstract_state())
      _check_data_info(saved_info, trainer.data_info(int(state.step)))
    else:
      state = trainer.init_state()
      if init_from:
        state = _load_initial_params(state, init_from, trainer)
    step = int(state.step)
    logging.info("mesh %s, data layout %s, starting at step %d of %d",
                 dict(trainer.mesh.shape), trainer.layout, step, train_steps)
    eval_sets = trainer.eval_sets() if eval_every else {}
    progress = _Progress(progress_bar, is_main, train_steps, step)

    def run_eval(at_step, params):
      scores = trainer.evaluate(params, eval_sets)
      writer.write("eval", at_step, scores)
      shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if not k.endswith("tokens"))
      progress.write(f"eval @ step {at_step}: {shown}")

    last_eval = None
    if eval_sets and eval_at_start and step == 0:
      run_eval(0, state.params)
      last_eval = 0

    interval = []

    def finish_step(done_step, metrics):
      """Host side of a finished step: NaN guard, progress bar, summaries."""
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      result.losses[done_step] = metrics["loss"]
      if metrics["nonfinite"]:
        result.nonfinite_steps.append(done_step)
        action = "applied anyway" if nan_policy == "none" else "update skipped"
        progress.write(f"non-finite loss/gradient at step {done_step}: {action} "
                       f"(nan_policy={nan_policy!r})")
        if nan_policy == "stop":
          raise NonFiniteLossError(done_step)
      rate = progress.tokens_per_second(metrics["input_tokens"] + metrics["target_tokens"])
      metrics["tokens_per_second"] = rate
      progress.update(metrics["cross_entropy"], rate)
      interval.append(metrics)
      if done_step % log_every == 0 or done_step == train_steps:
        mean = {k: float(np.mean([m[k] for m in interval])) for k in interval[0]}
        mean["nonfinite_steps"] = float(sum(m["nonfinite"] for m in interval))
        for k in ("nonfinite", "input_tokens", "target_tokens"):
          mean.pop(k)
        writer.write("train", done_step, mean)
        interval.clear()

    batches = None
    pending = None
    try:
      with preemption.PreemptionWatcher() as watcher:
        if step < train_steps:
          batches = trainer.data.train_batches(trainer.layout, start_batch=step)
        while step < train_steps:
          state, metrics = trainer.train_step(state, trainer.global_batch(next(batches)))
          if pending is not None:
            finish_step(*pending)
          step += 1
          pending = (step, metrics)
          if step % checkpoint_every == 0 and step < train_steps:
            ckpt.save(step, state, trainer.data_info(step))
          if eval_sets and eval_every and step % eval_every == 0:
            finish_step(*pending)
            pending = None
            run_eval(step, state.params)
            last_eval = step
          if watcher.should_stop(step):
            result.status = PREEMPTED
            break
        if pending is not None:
          finish_step(*pending)
          pending = None
      result.step = step
      if ckpt.latest_step() != step:
        ckpt.save(step, state, trainer.data_info(step), force=True)
      if result.status == PREEMPTED:
        ckpt.wait()
        progress.write(f"pre-empted: checkpoint saved at step {step}; run the same "
                       "command again to resume")
      else:
        if eval_sets and last_eval != step:
          run_eval(step, state.params)
        ckpt.wait()
    finally:
      progress.close()
      if batches is not None:
        batches.close()
      ckpt.close()
      writer.close()
  if export and result.status == COMPLETED:
    # Outside the mesh context: model_io traces the model without logical rules.
    path = export_model(model_dir, model_config, state.params)
    if path:
      progress.write(f"final model exported to {path}")
  if is_main and eval_sets:
    result.summary = metrics_lib.summarize(model_dir, list(eval_sets))
    if result.summary:
      metrics_lib.write_summary(model_dir, result.summary)
  return result


def _check_positive_ints(**values) -> None:
  for name, value in values.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _load_initial_params(state, path: str, trainer: Trainer):
  """Replaces the freshly initialised params by those of a model_io export."""
  from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top
  loaded = model_io.load_model(path)
  config, params = loaded[0], loaded[1]
  if config_lib.config_to_dict(config) != config_lib.config_to_dict(trainer.config):
    logging.warning("init_from %s: its config differs from the run's model_config", path)
  def place(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  params = jax.tree.map(place, params, trainer.state_shardings.params)
  logging.info("initial parameters loaded from %s", path)
  return state.replace(params=params)
