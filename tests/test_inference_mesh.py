"""Embeddings and completion on meshes of 8 forced CPU devices (in a subprocess: the
pytest process keeps one device) equal the single-device path.

Tolerance: sharded matmuls sum in another order, which moves float32 embeddings by a few
ulps (measured: max |diff| < 1e-6 on values of size ~1); 1e-5 absolute leaves a 10x
margin, while a mis-sliced batch or a missing all-reduce changes them at order 1.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ankh3_jax import inference_mesh

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "inference_mesh_worker.py")
ATOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("mesh") / "results.npz")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, WORKER, out], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  with np.load(out) as z:
    arrays = {k: z[k] for k in z.files}
  return json.loads(str(arrays.pop("info"))), arrays


def test_layouts_shard_what_they_say(results):
  info, _ = results
  assert info["single"]["mesh"] == {"data": 1, "model": 1}
  assert info["data8"]["mesh"] == {"data": 8, "model": 1}
  assert "replicated" in info["data8"]["reason"]
  # wi_0 kernel [embed=64, mlp=128]: replicated, mlp over model, embed over data (2-D).
  assert info["data8"]["kernel_shard"] == [64, 128]
  assert info["model2x4"]["kernel_shard"] == [64, 32]
  assert info["data8_2d"]["kernel_shard"] == [8, 128]
  # A third of the encoder's bytes per device: split 4 ways (the smallest that fits).
  assert info["auto_fit"]["mesh"] == {"data": 2, "model": 4}
  assert "do not fit" in info["auto_fit"]["reason"] and info["auto_fit"]["same_rules"]
  # Rows are padded to a multiple of the data axis; the single device pads nothing.
  assert info["single"]["traced"] == [[2, 128], [1, 128]]
  assert info["data8"]["traced"] == [[8, 128]]
  assert info["model2x4"]["traced"] == [[2, 128]]


@pytest.mark.parametrize("name", ["data8", "model2x4", "data8_2d"])
def test_sharded_embeddings_equal_single_device(results, name):
  _, arrays = results
  keys = [k for k in arrays if k.startswith("single/")]
  assert len(keys) == 10
  for key in keys:
    reference = arrays[key]
    other = arrays[key.replace("single/", f"{name}/", 1)]
    assert other.shape == reference.shape, key
    np.testing.assert_allclose(other, reference, rtol=0, atol=ATOL, err_msg=key)


@pytest.mark.parametrize("name", ["data8", "model2x4"])
def test_sharded_completion_is_identical(results, name):
  info, _ = results
  assert len(info["single"]["greedy"]) == 5
  assert info[name]["greedy"] == info["single"]["greedy"]


def test_parse_mesh():
  assert inference_mesh.parse_mesh("data=4,model=2") == ((4, 2), ("data", "model"))
  assert inference_mesh.parse_mesh("4,2") == ((4, 2), ("data", "model"))
  assert inference_mesh.parse_mesh("replica=2,data=-1") == ((2, -1), ("replica", "data"))
  for bad in ("data=0", "rows=2", "data=x", ""):
    with pytest.raises(ValueError, match="--mesh"):
      inference_mesh.parse_mesh(bad)
  with pytest.raises(ValueError, match=r"--mesh data=4: .* needs 4 devices, have 1"):
    inference_mesh.choose_layout(1000, mesh="data=4")
