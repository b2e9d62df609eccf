"""ankh3-train's guards: one run per MODEL_DIR (lock), the run record checked on resume,
the export never replacing a user's directory, and exit codes by cause."""
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys

import gin
import pytest

from ankh3_jax import config as config_lib
from ankh3_jax import main as main_lib
from ankh3_jax.training import run_lock
from ankh3_jax.training import run_settings
from train_worker import SYNTHETIC_GIN  # tests/ helper

TRAIN = "ankh3_jax.training.trainer.train"


@pytest.fixture()
def clean_gin():
  main_lib._register_configurables()
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture(scope="module")
def gin_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("gin") / "synthetic.gin"
  path.write_text(SYNTHETIC_GIN)
  return str(path)


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_lock_refuses_a_second_run_and_takes_over_a_dead_ones(tmp_path, caplog):
  first = run_lock.RunLock(str(tmp_path))
  assert first.acquire()
  with pytest.raises(run_lock.RunLockHeld) as held:
    run_lock.RunLock(str(tmp_path)).acquire()
  assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(held.value)
  first.release()
  assert run_lock.holder(str(tmp_path))["released"]
  # A run killed with the lock: the kernel dropped the flock, the record stays.
  (tmp_path / run_lock.LOCK_FILE).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": _dead_pid(), "started": "then"}))
  with caplog.at_level(logging.WARNING):
    with run_lock.RunLock(str(tmp_path)):
      assert run_lock.holder(str(tmp_path))["pid"] == os.getpid()
  assert "taking over the lock" in caplog.text and "no longer running" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert not run_lock.RunLock("gs://bucket/run").acquire()
  assert "no lock is taken" in caplog.text


def _settings(**model):
  return {"model": config_lib.config_to_dict(config_lib.preset("tiny", **model)),
          "data": {"source": "synthetic", "seed": 0},
          "training": {"train_steps": 10, "batch_size": 8}, "gin": {}}


def test_run_record_refuses_changes_unless_allowed(tmp_path, caplog):
  model_dir = str(tmp_path)
  first = run_settings.check_and_record(model_dir, _settings(), resuming=False)
  changed = _settings(feed_forward_proj="gated-gelu")
  changed["training"]["train_steps"] = 20
  with pytest.raises(run_settings.RunSettingsError) as refused:
    run_settings.check_and_record(model_dir, changed, resuming=True)
  message = str(refused.value)
  assert "model.feed_forward_proj: 'gated-silu' (saved) -> 'gated-gelu' (now)" in message
  assert "training.train_steps: 10 (saved) -> 20 (now)" in message
  with pytest.raises(run_settings.RunSettingsError, match="feed_forward_proj"):
    run_settings.check_and_record(model_dir, changed, resuming=True,
                                  allow_changed=["train_steps"])
  record = run_settings.check_and_record(model_dir, changed, resuming=True,
                                         allow_changed=["train_steps", "model"])
  assert record["run_id"] == first["run_id"]
  assert run_settings.read_record(model_dir)["changes"][0]["changed"][
      "training.train_steps"] == [10, 20]
  # A directory from before the record: resumes with a warning, gets one.
  os.remove(os.path.join(model_dir, run_settings.RECORD_FILE))
  with caplog.at_level(logging.WARNING):
    run_settings.check_and_record(model_dir, _settings(), resuming=True)
  assert "no run_settings.json" in caplog.text
  assert run_settings.read_record(model_dir)["settings"] == _settings()
  (tmp_path / run_settings.RECORD_FILE).write_text("{broken")
  with pytest.raises(run_settings.RunSettingsError, match="unreadable run record"):
    run_settings.check_and_record(model_dir, _settings(), resuming=True)


def test_allow_changed_hint_names_only_the_refused_setting():
  keys = ["training.train_steps", "model.name", "gin.a.make_schedule.name",
          "gin.a.make_schedule.peak_learning_rate", "gin.b.train.name"]
  names = {k: run_settings.allow_name(k, keys) for k in keys}
  assert names == {"training.train_steps": "train_steps", "model.name": "model.name",
                   "gin.a.make_schedule.name": "make_schedule.name",
                   "gin.a.make_schedule.peak_learning_rate": "peak_learning_rate",
                   "gin.b.train.name": "train.name"}
  for key, name in names.items():  # each hint allows its own key and no other
    assert [k for k in keys if run_settings.is_allowed(k, [name])] == [key]


def test_export_target_must_be_this_runs_export(tmp_path):
  target = tmp_path / "model"
  run_settings.check_export_target(str(target), "abc")  # absent: fine
  target.mkdir()
  (target / "weights.bin").write_text("mine")
  with pytest.raises(run_settings.RunSettingsError, match="not an export of this run"):
    run_settings.check_export_target(str(target), "abc")
  run_settings.write_export_marker(str(target), "other", 3)
  with pytest.raises(run_settings.RunSettingsError, match="export of another run"):
    run_settings.check_export_target(str(target), "abc")
  run_settings.write_export_marker(str(target), "abc", 3)
  run_settings.check_export_target(str(target), "abc")


def _run(capsys, *argv):
  return _run_out(capsys, *argv)[::2]


def _run_out(capsys, *argv):
  code = main_lib.run(list(argv))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_users_model_directory_is_refused_before_any_write(gin_file, tmp_path, capsys,
                                                           clean_gin):
  model_dir = tmp_path / "run"
  (model_dir / "model").mkdir(parents=True)
  (model_dir / "model" / "notes.txt").write_text("my own model")
  code, err = _run(capsys, f"--gin_file={gin_file}", f"--gin.MODEL_DIR={model_dir}")
  assert code == main_lib.EXIT_CONFIG_ERROR
  assert f"{model_dir / 'model'} exists and is not an export of this run" in err
  assert (model_dir / "model" / "notes.txt").read_text() == "my own model"
  assert sorted(os.listdir(model_dir)) == [run_lock.LOCK_FILE, "model"]


@pytest.mark.slow  # imports TensorFlow and builds the seqio mixture: 20-50 s on 2 busy cores
def test_missing_training_fasta_is_a_data_error_before_any_write(tmp_path, capsys,
                                                                 clean_gin):
  missing = str(tmp_path / "no_such_train.fa")
  run = lambda path: _run(
      capsys, "--gin_file=runs/demo.gin", f"--gin.MODEL_DIR={tmp_path / 'run'}",
      f"--gin.TRAIN_FASTA='{path}'", f"--gin.VALIDATION_FASTA='{path}'",
      f"--gin.DATA_PREFIX='missing_{len(path)}'")
  try:
    code, err = run(missing)
    glob_code, glob_err = run(str(tmp_path / "no_*.fa"))
  finally:
    gin.clear_config()
  assert code == main_lib.EXIT_DATA_ERROR, err
  assert missing in err and "no such file" in err
  assert glob_code == main_lib.EXIT_DATA_ERROR, glob_err
  assert str(tmp_path / "no_*.fa") in glob_err
  assert not (tmp_path / "run").exists()


def test_full_disk_is_an_os_error_not_a_configuration_error(gin_file, tmp_path, capsys,
                                                            clean_gin, monkeypatch):
  def full(*_):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run"))
  monkeypatch.setattr(run_settings, "write_record", full)
  code, err = _run(capsys, f"--gin_file={gin_file}", f"--gin.MODEL_DIR={tmp_path / 'run'}")
  assert code == main_lib.EXIT_OS_ERROR
  assert "disk or OS error: [Errno 28] No space left on device" in err
  assert "gin configuration" not in err


def test_configuration_errors_and_bugs(gin_file, tmp_path, capsys, clean_gin, monkeypatch):
  code, err = _run(capsys, f"--gin_file={gin_file}", f"--gin.MODEL_DIR={tmp_path / 'a'}",
                   f"--gin.{TRAIN}.num_microbatches=3")
  assert code == main_lib.EXIT_CONFIG_ERROR
  assert "gin configuration: batch size 8" in err and "In call to" not in err
  code, err = _run(capsys, "--gin_file=runs/demo.gin", f"--gin.MODEL_DIR={tmp_path / 'b'}",
                   "--gin.ankh3_jax.training.seqio_data.SeqioSource.host_mode='x'")
  assert code == main_lib.EXIT_CONFIG_ERROR and "host_mode must be one of" in err
  # Targets too short for MLM at 30%: refused before anything is written (no silent cap).
  code, err = _run(capsys, "--gin_file=runs/demo.gin", f"--gin.MODEL_DIR={tmp_path / 'c'}",
                   "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 64}")
  assert code == main_lib.EXIT_CONFIG_ERROR, err
  assert "ankh3_mlm_p30: MLM at p=0.3 with feature lengths inputs=128, targets=64" in err
  assert "'targets'] >= 77" in err and not (tmp_path / "c").exists()
  code, err = _run(capsys, "--gin_file=runs/demo.gin", f"--gin.MODEL_DIR={tmp_path / 'b'}",
                   "--gin.ankh3_jax.training.seqio_data.SeqioSource.mixture_or_task_name="
                   "'no_such_mixture'")
  assert code == main_lib.EXIT_CONFIG_ERROR and "no_such_mixture" in err
  assert not (tmp_path / "b").exists()
  # A bucket URL would become a local directory 'gs:/bucket/run', lost with the machine.
  monkeypatch.chdir(tmp_path)
  code, err = _run(capsys, f"--gin_file={gin_file}", "--gin.MODEL_DIR=gs://bucket/run")
  assert code == main_lib.EXIT_CONFIG_ERROR and "'gs://bucket/run' is a URL" in err
  assert "gcsfuse" in err and not (tmp_path / "gs:").exists()

  def bug(*_):
    raise KeyError("a bug")
  monkeypatch.setattr(run_settings, "current_settings", bug)
  with pytest.raises(KeyError, match="a bug"):
    main_lib.run([f"--gin_file={gin_file}", f"--gin.MODEL_DIR={tmp_path / 'c'}"])
  assert "internal error (a bug" in capsys.readouterr().err


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  return env


def _start(gin_file, model_dir, *args):
  err = open(f"{model_dir}.{len(os.listdir(os.path.dirname(model_dir)))}.err", "w")
  cmd = [sys.executable, "-m", "ankh3_jax.main", f"--gin_file={gin_file}",
         f"--gin.MODEL_DIR={model_dir}", "--log_level=INFO", *args]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=_env())
  proc.err_path = err.name
  return proc


def _finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  with open(proc.err_path) as f:
    return proc.returncode, out, f.read()


def _wait_for_steps(model_dir, proc, steps, timeout=240):
  import time  # pylint: disable=g-import-not-at-top
  from ankh3_jax.training import metrics  # pylint: disable=g-import-not-at-top
  path = os.path.join(model_dir, "train_metrics.jsonl")
  start = time.time()
  while len(metrics.read_jsonl(path)) < steps:
    assert proc.poll() is None, open(proc.err_path).read()[-3000:]
    assert time.time() - start < timeout, "timed out"
    time.sleep(0.2)


@pytest.mark.slow
def test_second_run_on_one_dir_is_refused_and_resume_checks_settings(gin_file, tmp_path,
                                                                     capsys, caplog,
                                                                     clean_gin):
  """Run A holds MODEL_DIR; run B on it exits 7 naming A; A, undisturbed, gets SIGTERM
  (a pre-emption notice): it saves a checkpoint and exits 0. Resuming with another
  activation or step count is refused (exit 2, listing both) until allowed; the allowed
  resume continues from A's checkpoint and exports a model marked with the run id."""
  model_dir = str(tmp_path / "run")
  long_run = (f"--gin.{TRAIN}.train_steps=100000", f"--gin.{TRAIN}.checkpoint_every=1000",
              f"--gin.{TRAIN}.eval_every=0")
  first = _start(gin_file, model_dir, *long_run)
  _wait_for_steps(model_dir, first, 2)
  assert run_lock.holder(model_dir)["pid"] == first.pid
  code, _, err = _finish(_start(gin_file, model_dir, *long_run))
  assert code == main_lib.EXIT_LOCKED, err[-3000:]
  assert (f"is in use by another ankh3-train (pid {first.pid} on host "
          f"{socket.gethostname()}") in err
  assert first.poll() is None  # undisturbed
  first.send_signal(signal.SIGTERM)
  code, out, err = _finish(first)
  assert code == 0, err[-3000:]
  step = int(out.split("pre-empted at step ")[1].split(";")[0])
  assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == [str(step)]
  assert run_lock.holder(model_dir)["released"]

  more = (f"--gin.{TRAIN}.train_steps={step + 2}", f"--gin.{TRAIN}.eval_every=0")
  code, err = _run(capsys, f"--gin_file={gin_file}", f"--gin.MODEL_DIR={model_dir}", *more,
                   "--gin.ankh3_jax.config.preset.feed_forward_proj='gated-gelu'")
  assert code == main_lib.EXIT_CONFIG_ERROR
  assert "model.feed_forward_proj: 'gated-silu' (saved) -> 'gated-gelu' (now)" in err
  assert f"training.train_steps: 100000 (saved) -> {step + 2} (now)" in err
  with caplog.at_level(logging.INFO):
    code, out, err = _run_out(capsys, f"--gin_file={gin_file}",
                              f"--gin.MODEL_DIR={model_dir}", *more,
                              "--allow_changed=train_steps")
  assert code == 0, err[-3000:]
  assert f"restored step {step}" in caplog.text
  assert f"trained to step {step + 2}" in out
  from ankh3_jax.training import metrics  # pylint: disable=g-import-not-at-top
  logged = {r["step"] for r in metrics.read_jsonl(
      os.path.join(model_dir, "train_metrics.jsonl"))}
  assert {step + 1, step + 2} <= logged
  marker = os.path.join(model_dir, "model", run_settings.EXPORT_MARKER)
  with open(marker) as f:
    assert json.load(f) == {"run_id": run_settings.read_record(model_dir)["run_id"],
                            "step": step + 2}
