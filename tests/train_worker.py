"""Subprocess side of the multi-device tests (a helper, not a test module).

Runs with forced CPU devices (set by the caller) and writes JSON results:
  python tests/train_worker.py meshes OUT.json
  python tests/train_worker.py remesh WORKDIR OUT.json
  python tests/train_worker.py meshes_and_remesh WORKDIR OUT.json
      (both in one process: {"meshes": ..., "remesh": ...}, one start-up instead of two)
  python tests/train_worker.py multiprocess WORKDIR OUT.json --coordinator_address=...
      --num_processes=2 --process_id=I      (flags appended by launch/local_multiprocess.py)
"""
import argparse
import json
import math
import os
import shutil
import sys

import gin
import jax

from ankh3_jax import config as config_lib
from ankh3_jax import partitioning
from ankh3_jax.training import synthetic_data
from ankh3_jax.training import trainer as trainer_lib

STEPS = 20
BATCH = 16
# 8 heads (not tiny's 4) so that every sharded dimension divides an 8-way axis.
MODEL = config_lib.preset("tiny", num_heads=8, d_kv=8)
# A short warm-up so that 20 steps move the loss a lot.
GIN = """
ankh3_jax.training.optimizers.make_schedule.name = 'rsqrt'
ankh3_jax.training.optimizers.make_schedule.warmup_steps = 5
ankh3_jax.training.optimizers.make_schedule.peak_learning_rate = 0.02
"""
SYNTHETIC_STEPS = 16
# A CLI run on synthetic data (include models/tiny.gin; bind MODEL_DIR).
SYNTHETIC_GIN = f"""
include 'models/tiny.gin'
import ankh3_jax.training.optimizers
import ankh3_jax.training.synthetic_data
import ankh3_jax.training.trainer

MODEL_DIR = %gin.REQUIRED
ankh3_jax.training.trainer.train.model_dir = %MODEL_DIR
ankh3_jax.training.trainer.train.model_config = %MODEL_CONFIG
ankh3_jax.training.trainer.train.data_source = @ankh3_jax.training.synthetic_data.SyntheticSource()
ankh3_jax.training.trainer.train.batch_size = 8
ankh3_jax.training.trainer.train.train_steps = {SYNTHETIC_STEPS}
ankh3_jax.training.trainer.train.log_every = 1
ankh3_jax.training.trainer.train.eval_every = 8
ankh3_jax.training.trainer.train.checkpoint_every = 2
ankh3_jax.training.trainer.train.keep_checkpoints = 2
ankh3_jax.training.trainer.train.progress_bar = False
ankh3_jax.training.synthetic_data.SyntheticSource.task_feature_lengths = {{'inputs': 32, 'targets': 32}}
ankh3_jax.training.optimizers.make_schedule.warmup_steps = 4
ankh3_jax.training.optimizers.make_schedule.peak_learning_rate = 0.02
"""

# name: (mesh shape, parameter partitioning dims, microbatches)
MESHES = {
    "single": ((1, 1), 1, 1),
    "8x1": ((8, 1), 1, 1),
    "2x4_2d": ((2, 4), 2, 1),
    "1x8": ((1, 8), 1, 1),
    "2x4_2d_micro2": ((2, 4), 2, 2),
}


def source():
  return synthetic_data.SyntheticSource({"inputs": 32, "targets": 32}, seed=0)


def make_mesh(shape, dims):
  devices = jax.devices()[:math.prod(shape)]
  mesh = partitioning.create_mesh(shape, devices=devices)
  return mesh, partitioning.standard_logical_axis_rules(
      mesh.axis_names, parameter_partitioning_dims=dims)


def trajectory(shape, dims, micro, steps=STEPS) -> list:
  """Losses of `steps` train steps through the Trainer (sharded init, global batches)."""
  mesh, rules = make_mesh(shape, dims)
  data = source()
  trainer = trainer_lib.Trainer(MODEL, data, BATCH, steps, micro, mesh=mesh, rules=rules)
  losses = []
  with trainer.context():
    state = trainer.init_state()
    batches = data.train_batches(trainer.layout)
    for _ in range(steps):
      state, metrics = trainer.train_step(state, trainer.global_batch(next(batches)))
      losses.append(float(metrics["loss"]))
  return losses


def run_train(model_dir, shape, dims, steps, **kwargs):
  mesh, rules = make_mesh(shape, dims)
  defaults = dict(eval_every=0, log_every=1, progress_bar=False, export=False,
                  checkpoint_every=1000, keep_checkpoints=None)
  defaults.update(kwargs)
  result = trainer_lib.train(model_dir=model_dir, model_config=MODEL, data_source=source(),
                             batch_size=BATCH, train_steps=steps, mesh=mesh, rules=rules,
                             **defaults)
  return {str(k): v for k, v in result.losses.items()}


def meshes(out):
  return {name: trajectory(*spec) for name, spec in MESHES.items()}


def remesh(workdir):
  """Checkpoint on 8x1 at step 3, resume on other meshes; compare steps 4-6."""
  first = os.path.join(workdir, "first")
  results = {"8x1": run_train(first, (8, 1), 1, 6, checkpoint_every=3)}
  for name, (shape, dims) in {"2x4_2d": ((2, 4), 2), "single": ((1, 1), 1)}.items():
    target = os.path.join(workdir, name)
    os.makedirs(os.path.join(target, "checkpoints"))
    shutil.copytree(os.path.join(first, "checkpoints", "3"),
                    os.path.join(target, "checkpoints", "3"))
    results[name] = run_train(target, shape, dims, 6)
  return results


def multiprocess(workdir):
  """The same trajectories from 2 processes x 4 devices (full train(), checkpoints,
  export)."""
  results = {}
  for name in ("2x4_2d", "1x8"):
    shape, dims, _ = MESHES[name]
    results[name] = run_train(os.path.join(workdir, name), shape, dims, STEPS,
                              checkpoint_every=10, export=True)
  return results


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=("meshes", "remesh", "meshes_and_remesh",
                                       "multiprocess"))
  parser.add_argument("paths", nargs="+")
  parser.add_argument("--coordinator_address")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  args = parser.parse_args()
  if args.coordinator_address:
    partitioning.initialize_distributed(args.coordinator_address, args.num_processes,
                                        args.process_id)
  gin.parse_config(GIN)
  out = args.paths[-1]
  if args.mode == "meshes":
    results = meshes(out)
  elif args.mode == "meshes_and_remesh":
    results = {"meshes": meshes(out), "remesh": remesh(args.paths[0])}
  else:
    results = globals()[args.mode](args.paths[0])
  results["devices"] = jax.device_count()
  results["processes"] = jax.process_count()
  if jax.process_index() == 0:
    with open(out, "w", encoding="utf-8") as f:
      json.dump(results, f)
  print("worker done", file=sys.stderr)


if __name__ == "__main__":
  main()
