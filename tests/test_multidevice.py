"""Sharded training on 8 forced CPU devices, in subprocesses (the pytest process itself
keeps one device): mesh shapes, restore onto another mesh, 2 jax.distributed processes.

Tolerance: the same 20 steps on meshes (8,1), (2,4) with 2-D parameter partitioning,
(1,8), (2,4) with 2 microbatches and a single device agree to rtol 1e-5 in float32.
Sharded matmuls and all-reduces sum in a different order, which moves the loss by a few
ulps per step (measured: < 1e-6 relative after 20 steps, with the loss falling from 6.1
to 3.4); 1e-5 leaves a 10x margin while any real sharding bug (a missing all-reduce, a
mis-sliced batch) changes the loss at the 1e-2 level.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "train_worker.py")
LAUNCHER = os.path.join(ROOT, "launch", "local_multiprocess.py")
RTOL = 1e-5


def _env(devices=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _run(cmd, env, timeout=900):
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  return proc


@pytest.fixture(scope="module")
def mesh_losses(tmp_path_factory):
  out = tmp_path_factory.mktemp("meshes") / "losses.json"
  _run([sys.executable, WORKER, "meshes", str(out)], _env(8))
  with open(out) as f:
    results = json.load(f)
  assert results["devices"] == 8
  return results


def test_meshes_give_the_same_trajectory(mesh_losses):
  reference = np.asarray(mesh_losses["single"])
  assert len(reference) == 20 and reference[-1] < reference[0] - 1.0
  for name in ("8x1", "2x4_2d", "1x8", "2x4_2d_micro2"):
    np.testing.assert_allclose(mesh_losses[name], reference, rtol=RTOL, err_msg=name)


def test_restore_into_a_different_mesh(tmp_path):
  out = tmp_path / "remesh.json"
  _run([sys.executable, WORKER, "remesh", str(tmp_path), str(out)], _env(8))
  with open(out) as f:
    results = json.load(f)
  reference = [results["8x1"][str(s)] for s in (4, 5, 6)]
  for name in ("2x4_2d", "single"):
    assert sorted(results[name]) == ["4", "5", "6"], name  # resumed at step 3
    np.testing.assert_allclose([results[name][str(s)] for s in (4, 5, 6)], reference,
                               rtol=RTOL, err_msg=name)


def test_two_processes_match_one(mesh_losses, tmp_path):
  out = tmp_path / "mp.json"
  _run([sys.executable, LAUNCHER, "--num_processes", "2", "--devices_per_process", "4",
        "--timeout", "800", "--", sys.executable, WORKER, "multiprocess", str(tmp_path),
        str(out)], _env())
  with open(out) as f:
    results = json.load(f)
  assert results["processes"] == 2 and results["devices"] == 8
  for name in ("2x4_2d", "1x8"):
    losses = [results[name][str(s)] for s in range(1, 21)]
    np.testing.assert_allclose(losses, mesh_losses["single"], rtol=RTOL, err_msg=name)
    assert os.path.isdir(tmp_path / name / "checkpoints" / "20")
    assert os.path.isfile(tmp_path / name / "model" / "config.json")
