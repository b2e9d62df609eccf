"""One ablation experiment's pre-training: its gin settings, the `ankh3-train` run (in a
subprocess, resumable) and what the run wrote (curves, token counts, validation).

An experiment is finished when its MODEL_DIR holds the exported model and the marker
`ablation_done.json`, written after `ankh3-train` exits with 0. Re-running an unfinished
one resumes from its newest checkpoint (the trainer's own resume).
"""
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

from ankh3_jax.ablation import files
from ankh3_jax.ablation import tokens as tokens_lib

DONE_FILE = "ablation_done.json"
LOG_FILE = "train.log"
TRAIN = "ankh3_jax.training.trainer.train"


def gin_file(name: str) -> str:
  return f"experiments/{name}.gin"


def _parse(name: str, bindings: Sequence[str], extra_gin_files: Sequence[str] = ()):
  """Parses experiment `name` (then `extra_gin_files`, then `bindings`) into a clean gin
  config with a placeholder MODEL_DIR."""
  import gin  # pylint: disable=g-import-not-at-top
  from ankh3_jax import gin_files, main  # pylint: disable=g-import-not-at-top
  main._register_configurables()  # pylint: disable=protected-access
  gin.clear_config()
  gin_files.parse([gin_file(name), *extra_gin_files], ["MODEL_DIR=unused", *bindings])
  return gin


def settings(name: str, bindings: Sequence[str] = (),
             extra_gin_files: Sequence[str] = ()) -> dict:
  """The settings of experiment `name` that the ablation holds equal or varies."""
  from ankh3_jax.tasks import pretrain  # pylint: disable=g-import-not-at-top
  gin = _parse(name, bindings, extra_gin_files)
  query = gin.query_parameter
  mixture = pretrain.objective()  # the bound task or mixture (registered once)
  out = {
      "gin_file": gin_file(name),
      "extra_gin_files": list(extra_gin_files),
      "model_preset": query("ankh3_jax.config.preset.name"),
      "feature_lengths": dict(query("%TASK_FEATURE_LENGTHS")),
      "train_steps": query("%TRAIN_STEPS"),
      "batch_size": query("%BATCH_SIZE"),
      "seed": query("%SEED"),
      "pack": query("ankh3_jax.training.seqio_data.SeqioSource.pack"),
      "eval_tasks": list(query("ankh3_jax.training.seqio_data.SeqioSource.eval_task_names")),
      "mixture": mixture,
      "task_rates": dict(pretrain.task_rates(mixture)),
  }
  gin.clear_config()
  return out


def is_finished(model_dir: str) -> bool:
  return (os.path.isfile(os.path.join(model_dir, DONE_FILE))
          and os.path.isfile(os.path.join(model_dir, "model", "config.json")))


def _latest_checkpoint(model_dir: str) -> int:
  root = os.path.join(model_dir, "checkpoints")
  steps = [int(d) for d in os.listdir(root) if d.isdigit()] if os.path.isdir(root) else []
  return max(steps, default=0)


def train_command(name: str, model_dir: str, train_steps: Optional[int] = None,
                  bindings: Sequence[str] = (), extra_gin_files: Sequence[str] = ()) -> list:
  """The `ankh3-train` command line of experiment `name` (no progress bar)."""
  cmd = [sys.executable, "-m", "ankh3_jax.main", f"--gin_file={gin_file(name)}",
         *(f"--gin_file={f}" for f in extra_gin_files),
         f"--gin.MODEL_DIR={model_dir}", f"--gin.{TRAIN}.progress_bar=False"]
  if train_steps is not None:
    cmd.append(f"--gin.TRAIN_STEPS={train_steps}")
  return cmd + [f"--gin.{b}" for b in bindings]


def run(name: str, model_dir: str, train_steps: Optional[int] = None,
        bindings: Sequence[str] = (), compile_cache: Optional[str] = None,
        extra_gin_files: Sequence[str] = ()) -> dict:
  """Trains experiment `name` into `model_dir` (or resumes it); returns the done record.

  `extra_gin_files` are parsed after the experiment's own file (e.g. a budget).
  Output goes to MODEL_DIR/train.log. `compile_cache`: JAX's persistent compilation
  cache directory (the experiments compile the same train step; unless
  JAX_COMPILATION_CACHE_DIR is set). Raises RuntimeError naming the log on failure.
  """
  model_dir = os.path.abspath(model_dir)
  os.makedirs(model_dir, exist_ok=True)
  cmd = train_command(name, model_dir, train_steps, bindings, extra_gin_files)
  resumed_from = _latest_checkpoint(model_dir)
  log_path = os.path.join(model_dir, LOG_FILE)
  start = time.time()
  with open(log_path, "a", encoding="utf-8") as log:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if compile_cache:
      env.setdefault("JAX_COMPILATION_CACHE_DIR", compile_cache)
    code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
  if code != 0:
    raise RuntimeError(f"training of {name} failed (exit code {code}); see {log_path}")
  record = {"experiment": name, "command": cmd, "seconds": time.time() - start,
            "resumed_from_step": resumed_from}
  files.write_json(os.path.join(model_dir, DONE_FILE), record)
  return record


def read_run(model_dir: str) -> dict:
  """Curves, measured tokens, validation and timing of a finished run."""
  from ankh3_jax.training import metrics  # pylint: disable=g-import-not-at-top
  train = metrics.read_jsonl(os.path.join(model_dir, "train_metrics.jsonl"))
  evals = metrics.read_jsonl(os.path.join(model_dir, "eval_metrics.jsonl"))
  done = files.read_json(os.path.join(model_dir, DONE_FILE))
  eval_curves = {}
  for record in evals:
    for key, value in record.items():
      if key != "step" and not key.endswith("/tokens"):
        eval_curves.setdefault(key, []).append((record["step"], value))
  return {
      "train_curve": [(r["step"], r["cross_entropy"]) for r in train],
      "eval_curves": eval_curves,
      "final_eval": {k: v for k, v in (evals[-1] if evals else {}).items() if k != "step"},
      "tokens": tokens_lib.read_counts(model_dir),
      "train_seconds": done["seconds"],
      "resumed_from_step": done["resumed_from_step"],
  }
