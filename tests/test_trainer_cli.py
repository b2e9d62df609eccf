"""End-to-end runs of `python -m ankh3_jax.main` on synthetic data (one CPU device):
checkpoints, summaries, export, SIGKILL + resume, corrupt checkpoints, SIGTERM, NaN guard."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import gin
import numpy as np
import pytest

from ankh3_jax import main as main_lib
from ankh3_jax.training import metrics
from train_worker import SYNTHETIC_GIN, SYNTHETIC_STEPS as STEPS  # tests/ helper

pytestmark = pytest.mark.slow

TRAIN = "ankh3_jax.training.trainer.train"


@pytest.fixture(scope="module")
def gin_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("gin") / "synthetic.gin"
  path.write_text(SYNTHETIC_GIN)
  return str(path)


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  return env


def _start(gin_file, model_dir, *bindings, log_level="INFO"):
  """Starts a training subprocess; its stdout/stderr go to files in model_dir's parent."""
  os.makedirs(model_dir, exist_ok=True)
  tag = f"{int(time.time() * 1000)}"
  out = open(f"{model_dir}.{tag}.out", "w")
  err = open(f"{model_dir}.{tag}.err", "w")
  cmd = [sys.executable, "-m", "ankh3_jax.main", f"--gin_file={gin_file}",
         f"--gin.MODEL_DIR={model_dir}", f"--log_level={log_level}",
         *[f"--gin.{b}" for b in bindings]]
  proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=_env())
  proc.out_path, proc.err_path = out.name, err.name
  return proc


def _finish(proc, timeout=300):
  rc = proc.wait(timeout=timeout)
  with open(proc.out_path) as f:
    out = f.read()
  with open(proc.err_path) as f:
    err = f.read()
  return rc, out, err


def _losses(model_dir):
  return {r["step"]: r["loss"] for r in metrics.read_jsonl(
      os.path.join(model_dir, "train_metrics.jsonl"))}


def _wait_for(predicate, proc, timeout=240):
  start = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"training exited early with {proc.returncode}: "
                           + open(proc.err_path).read()[-3000:])
    if time.time() - start > timeout:
      proc.kill()
      raise AssertionError("timed out waiting for the training subprocess")
    time.sleep(0.2)


def _completed_checkpoints(model_dir):
  directory = os.path.join(model_dir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


@pytest.fixture(scope="module")
def uninterrupted_started(gin_file, tmp_path_factory):
  """(model_dir, process) of the reference run, started by the first test that asks
  (the SIGKILL test: its runs go on beside this one) and not waited for."""
  model_dir = str(tmp_path_factory.mktemp("runs") / "full")
  proc = _start(gin_file, model_dir)
  yield model_dir, proc
  if proc.poll() is None:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_started):
  """(model_dir, stdout, stderr) of the finished reference run."""
  model_dir, proc = uninterrupted_started
  rc, out, err = _finish(proc)
  assert rc == 0, err[-3000:]
  return model_dir, out, err


def _exported_params(model_dir):
  from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top
  return model_io.load_model(os.path.join(model_dir, "model"))[1]


def _assert_same_params(model_dir, reference_dir):
  import jax  # pylint: disable=g-import-not-at-top
  got, want = _exported_params(model_dir), _exported_params(reference_dir)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-identical


def _last_step(model_dir):
  path = os.path.join(model_dir, "train_metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f if line.endswith("\n")]
  return json.loads(lines[-1])["step"] if lines else 0


KILLS = 5


@pytest.mark.usefixtures("uninterrupted_started")  # the reference trains meanwhile
def test_five_sigkills_in_a_row_then_bit_identical_params(gin_file, tmp_path, request):
  """kill -9 at 5 random, increasing steps (some land mid-save); each rerun resumes
  from the newest finished checkpoint. Same program on the same device, so every
  step's loss and the final parameters equal the uninterrupted run's bit for bit
  (which trains meanwhile: the first test of this file, so the two overlap)."""
  model_dir = str(tmp_path / "killed")
  kill_after = sorted(random.Random().sample(range(2, STEPS - 3), KILLS))
  print(f"SIGKILL after steps {kill_after}")
  resumed = []
  for kill_step in kill_after:
    proc = _start(gin_file, model_dir)
    _wait_for(lambda: _last_step(model_dir) >= kill_step, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    resumed.append(max(_completed_checkpoints(model_dir) or [0]))
    assert resumed[-1] < STEPS
  assert resumed == sorted(resumed)
  rc, _, err = _finish(_start(gin_file, model_dir))
  assert rc == 0, err[-3000:]
  assert f"restored step {resumed[-1]}" in err
  uninterrupted = request.getfixturevalue("uninterrupted")
  reference = _losses(uninterrupted[0])
  losses = _losses(model_dir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  np.testing.assert_array_equal([losses[s] for s in range(1, STEPS + 1)],
                                [reference[s] for s in range(1, STEPS + 1)])
  _assert_same_params(model_dir, uninterrupted[0])


def test_run_writes_checkpoints_summaries_and_model(uninterrupted):
  model_dir, out, _ = uninterrupted
  assert f"validation, step 0 -> {STEPS}" in out
  assert "synthetic_copy" in out and "synthetic_reverse" in out
  with open(os.path.join(model_dir, "eval_summary.json")) as f:
    summary = json.load(f)
  for task in ("synthetic_copy", "synthetic_reverse"):
    entry = summary["tasks"][task]
    assert entry["loss_last"] < entry["loss_first"]
  assert _completed_checkpoints(model_dir) == [STEPS - 2, STEPS]  # keep_checkpoints=2
  assert sorted(_losses(model_dir)) == list(range(1, STEPS + 1))
  records = metrics.read_jsonl(os.path.join(model_dir, "train_metrics.jsonl"))
  for record in records:  # batch of 8 rows: tokens counted without padding
    assert record["input_tokens"] > 0 and record["target_tokens"] > 0
    assert record["nonfinite_steps"] == 0.0 and record["tokens_per_second"] > 0
  for run in ("train", "eval"):
    assert any(n.startswith("events.out.tfevents")
               for n in os.listdir(os.path.join(model_dir, run)))
  assert os.path.isfile(os.path.join(model_dir, "operative_config.gin"))
  from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top
  config, params, _ = model_io.load_model(os.path.join(model_dir, "model"))
  assert config.d_model == 64 and "encoder" in params


def test_corrupt_latest_checkpoint_falls_back_and_ends_identical(gin_file, uninterrupted,
                                                                 tmp_path):
  """Flip bytes in the newest checkpoint's largest array file: the rerun names it,
  moves it aside, resumes from the one before and ends with the same parameters."""
  model_dir = str(tmp_path / "corrupt")
  shutil.copytree(os.path.join(uninterrupted[0], "checkpoints"),
                  os.path.join(model_dir, "checkpoints"))
  newest = os.path.join(model_dir, "checkpoints", str(STEPS))
  files = [os.path.join(root, n) for root, _, names in os.walk(os.path.join(newest, "state"))
           for n in names if os.sep + "d" + os.sep in os.path.join(root, n)]
  target = max(files, key=os.path.getsize)
  with open(target, "r+b") as f:
    f.seek(os.path.getsize(target) // 2)
    chunk = f.read(64)
    f.seek(os.path.getsize(target) // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))
  rc, _, err = _finish(_start(gin_file, model_dir))
  assert rc == 0, err[-3000:]
  assert f"{newest}: corrupt" in err or f"{newest}: cannot be read" in err
  assert f"restored step {STEPS - 2}" in err
  assert os.path.isdir(os.path.join(model_dir, "corrupt_checkpoints", str(STEPS)))
  assert _completed_checkpoints(model_dir) == [STEPS - 2, STEPS]
  reference = _losses(uninterrupted[0])
  losses = _losses(model_dir)
  assert [losses[s] for s in (STEPS - 1, STEPS)] == [reference[s] for s in (STEPS - 1, STEPS)]
  _assert_same_params(model_dir, uninterrupted[0])


# SIGTERM (pre-emption) and the resume after it: tests/test_run_safety.py::
# test_second_run_on_one_dir_is_refused_and_resume_checks_settings (one run serves both).


@pytest.fixture()
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nan_guard_reports_the_step(policy, gin_file, tmp_path, capsys, clean_gin):
  """Batch 5 has NaN loss weights, so step 6's loss is NaN."""
  code = main_lib.run([
      f"--gin_file={gin_file}", f"--gin.MODEL_DIR={tmp_path / policy}",
      "--gin.ankh3_jax.training.synthetic_data.SyntheticSource.poison_batches=[5]",
      f"--gin.{TRAIN}.nan_policy='{policy}'", f"--gin.{TRAIN}.train_steps=8",
      f"--gin.{TRAIN}.eval_every=0", f"--gin.{TRAIN}.export=False"])
  captured = capsys.readouterr()
  assert "non-finite loss/gradient at step 6" in captured.err
  if policy == "skip":
    assert code == 0
    assert "non-finite steps (updates skipped): [6]" in captured.out
    losses = _losses(str(tmp_path / policy))
    assert np.isnan(losses[6]) and np.isfinite(losses[8])
  else:
    assert code == main_lib.EXIT_NONFINITE
    assert "non-finite loss or gradient at step 6; stopping" in captured.err


def test_finetune_starts_from_the_exported_model(gin_file, uninterrupted, tmp_path, capsys,
                                                 clean_gin):
  """init_from=MODEL_DIR/model: the fine-tune's step-0 validation equals the
  pre-training run's final one (same parameters, same eval batches)."""
  pretrained = uninterrupted[0]
  code = main_lib.run([
      f"--gin_file={gin_file}", f"--gin.MODEL_DIR={tmp_path / 'ft'}",
      f"--gin.{TRAIN}.init_from='{os.path.join(pretrained, 'model')}'",
      f"--gin.{TRAIN}.train_steps=2", f"--gin.{TRAIN}.export=False"])
  assert code == 0, capsys.readouterr().err[-3000:]
  before = metrics.read_jsonl(os.path.join(pretrained, "eval_metrics.jsonl"))[-1]
  after = metrics.read_jsonl(str(tmp_path / "ft" / "eval_metrics.jsonl"))[0]
  assert after["step"] == 0
  for key in ("synthetic_copy/loss", "synthetic_reverse/loss"):
    assert after[key] == pytest.approx(before[key], rel=1e-6)
