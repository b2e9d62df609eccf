"""The main job on the real corpus: seqio tasks -> packed batches -> training -> per-task
validation; and the seqio stream's resume-by-skipping determinism."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ankh3_jax import cpu_tuning
from ankh3_jax.partitioning import DataLayout

pytestmark = pytest.mark.slow

TASKS = ("ankh3_completion", "ankh3_mlm_p15", "ankh3_mlm_p20", "ankh3_mlm_p30")
TRAIN = "ankh3_jax.training.trainer.train"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """(working directory, process) of `ankh3-train` with no gin file, started by the first
  test that asks (the in-process test right below runs meanwhile) and not waited for."""
  workdir = tmp_path_factory.mktemp("demo")
  script = os.path.join(os.path.dirname(sys.executable), "ankh3-train")
  cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "ankh3_jax.main"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  with open(workdir / "stdout.txt", "w") as out, open(workdir / "stderr.txt", "w") as err:
    proc = subprocess.Popen(
        cmd + ["--gin.TRAIN_STEPS=60", "--gin.BATCH_SIZE=8", f"--gin.{TRAIN}.eval_every=30",
               f"--gin.{TRAIN}.checkpoint_every=30",
               "--gin.ankh3_jax.training.seqio_data.SeqioSource.max_eval_batches=2"],
        cwd=workdir, env=env, stdout=out, stderr=err)
  yield workdir, proc
  if proc.poll() is None:
    proc.kill()
    proc.wait()


@pytest.mark.usefixtures("demo_run")  # the demo trains meanwhile
def test_seqio_stream_resumes_by_skipping():
  from ankh3_jax.tasks import pretrain  # pylint: disable=g-import-not-at-top
  from ankh3_jax.training import seqio_data  # pylint: disable=g-import-not-at-top
  name = pretrain.PRETRAIN_MIXTURE
  source = seqio_data.SeqioSource(name, {"inputs": 64, "targets": 48}, seed=3,
                                  host_mode="slice")
  layout = DataLayout(4, 0, 1)
  fresh = source.train_batches(layout, start_batch=0)
  first = [next(fresh) for _ in range(5)]
  fresh.close()
  resumed = source.train_batches(layout, start_batch=3)
  later = [next(resumed) for _ in range(2)]
  resumed.close()
  for expected, got in zip(first[3:], later):
    assert expected.keys() == got.keys()
    for key in expected:
      np.testing.assert_array_equal(expected[key], got[key])
  # 'slice' rows of a 2-shard layout are the halves of the global batch.
  half = next(source.train_batches(DataLayout(4, 1, 2), start_batch=0))
  np.testing.assert_array_equal(half["encoder_input_tokens"],
                                first[0]["encoder_input_tokens"][2:])


def test_default_demo_trains_every_task(demo_run):
  """`ankh3-train` with no gin file runs runs/demo.gin (here shortened by bindings) in a
  fresh runs/demo-<time> directory under the working directory."""
  tmp_path, proc = demo_run
  code = proc.wait(timeout=900)
  stdout = (tmp_path / "stdout.txt").read_text()
  stderr = (tmp_path / "stderr.txt").read_text()
  assert code == 0, stderr[-4000:]
  (model_dir,) = glob.glob(str(tmp_path / "runs" / "demo-*"))
  assert "validation, step 0 -> 60" in stdout
  assert "tok_s=" in stderr  # the progress bar
  # The command's CPU defaults (the huge pages restart it once, so it must get this far).
  settings = next((l for l in stderr.splitlines() if "process settings:" in l), "")
  assert ("huge pages" in settings) == cpu_tuning.huge_pages_available()
  assert ("Eigen matmuls" in settings) == cpu_tuning.eigen_dots_flag_known()
  assert ("numpy's OpenBLAS" in settings) == cpu_tuning.blas_products_chosen()
  with open(os.path.join(model_dir, "eval_summary.json")) as f:
    summary = json.load(f)
  assert set(summary["tasks"]) == set(TASKS)
  for task, entry in summary["tasks"].items():
    assert entry["loss_last"] < entry["loss_first"] - 0.5, task
    # The headline: residue targets only, beside the baselines on the same positions.
    last = entry["residue_last"]
    assert 2.7 < last["unigram_loss"] < 3.1 and last["composition_loss"] < last["unigram_loss"]
    assert last["gap_unigram"] == pytest.approx(last["unigram_loss"] - last["residue_loss"])
    assert last["residue_loss_ci_low"] <= last["residue_loss"] <= last["residue_loss_ci_high"]
    assert last["residue_perplexity"] == pytest.approx(np.exp(last["residue_loss"]))
    if task == "ankh3_completion":
      assert "masking_rate" not in last and last["eos_tokens"] > 0
    else:  # the rate the objective really applied: no cap at these lengths
      assert last["masking_rate"] == pytest.approx(int(task[-2:]) / 100, abs=0.01)
  assert "residue targets only" in stdout and "gap vs unigram" in stdout
  assert os.path.isfile(os.path.join(model_dir, "residue_baselines.json"))
  assert os.path.isdir(os.path.join(model_dir, "checkpoints", "60"))
  assert os.path.isfile(os.path.join(model_dir, "model", "config.json"))
