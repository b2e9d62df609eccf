"""Checkpoint integrity: checksums, corrupted/truncated checkpoints, fallback, atomicity."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ankh3_jax.training import checkpoints

MESH = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1), ("data",))
SHARDING = NamedSharding(MESH, P())


def _state(step: int):
  key = jax.random.key(step)
  return {"params": {"w": jax.random.normal(key, (256, 256)),
                     "b": jnp.arange(7, dtype=jnp.bfloat16)},
          "step": jnp.int32(step)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=SHARDING),
                      state)


@pytest.fixture()
def saved(tmp_path):
  """A directory with checkpoints at steps 2, 4 and 6."""
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), save_every=2, keep=None,
                                  async_save=True)
  for step in (2, 4, 6):
    assert ckpt.save(step, _state(step), {"batches_consumed": step})
  ckpt.close()
  return str(tmp_path / "checkpoints")


def _reopen(directory):
  return checkpoints.Checkpointer(directory, save_every=2, keep=None, async_save=False)


def _files(step_dir):
  out = []
  for root, _, names in os.walk(step_dir):
    out += [os.path.join(root, n) for n in names]
  return out


def _largest_data_file(step_dir):
  return max((f for f in _files(os.path.join(step_dir, "state")) if "/d/" in f),
             key=os.path.getsize)


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_roundtrip_is_verified_and_returns_the_data(saved):
  ckpt = _reopen(saved)
  state, data = ckpt.restore(_abstract(_state(0)))
  assert data == {"batches_consumed": 6}
  _assert_equal(state, _state(6))
  with open(os.path.join(saved, "6", "data", "metadata")) as f:
    assert len(json.load(f)[checkpoints.CHECKSUMS]) == 3


def test_checksum_sees_one_element_and_swaps():
  w = np.arange(1000, dtype=np.float32)
  base = checkpoints.state_checksums({"w": w})
  one = w.copy()
  one[500] = np.nextafter(one[500], np.float32(np.inf))
  swapped = w.copy()
  swapped[[3, 4]] = swapped[[4, 3]]
  assert checkpoints.state_checksums({"w": one}) != base
  assert checkpoints.state_checksums({"w": swapped}) != base
  assert checkpoints.state_checksums({"w": w.copy()}) == base


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_bytes(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(16)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))


def _corrupt_json(path):
  with open(path, "w") as f:
    f.write('{"batches_consumed": ')


def _remove(path):
  os.remove(path)


CORRUPTIONS = {
    "truncated_data": lambda d: _truncate(_largest_data_file(d)),
    "flipped_bytes": lambda d: _flip_bytes(_largest_data_file(d)),
    "truncated_json": lambda d: _corrupt_json(os.path.join(d, "data", "metadata")),
    "missing_array_file": lambda d: _remove(_largest_data_file(d)),
    "emptied_files": lambda d: [open(f, "w").close() for f in _files(d)],
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_latest_falls_back_to_the_last_good_one(saved, corruption, caplog):
  CORRUPTIONS[corruption](os.path.join(saved, "6"))
  ckpt = _reopen(saved)
  with pytest.raises(checkpoints.CheckpointError, match=os.path.join(saved, "6")):
    ckpt.restore(_abstract(_state(0)), 6)
  state, data = ckpt.restore_latest_good(_abstract(_state(0)))
  assert data["batches_consumed"] == 4
  _assert_equal(state, _state(4))
  assert ckpt.all_steps() == [2, 4]
  moved = os.path.join(os.path.dirname(saved), checkpoints.QUARANTINE, "6")
  assert os.path.isdir(moved)  # kept for inspection, not deleted
  assert "fell back to step 4" in caplog.text
  # Training goes on: step 6 can be written again and is the new latest.
  assert ckpt.save(6, _state(60), {"batches_consumed": 6}, force=True)
  ckpt.wait()
  state, _ = _reopen(saved).restore_latest_good(_abstract(_state(0)))
  _assert_equal(state, _state(60))


def test_every_checkpoint_corrupt_is_an_error_and_moves_nothing(saved):
  for step in (2, 4, 6):
    _truncate(_largest_data_file(os.path.join(saved, str(step))))
  ckpt = _reopen(saved)
  with pytest.raises(checkpoints.CheckpointError, match="no intact checkpoint") as info:
    ckpt.restore_latest_good(_abstract(_state(0)))
  for step in (2, 4, 6):
    assert os.path.join(saved, str(step)) in str(info.value)
  assert ckpt.all_steps() == [2, 4, 6]
  assert not os.path.exists(os.path.join(os.path.dirname(saved), checkpoints.QUARANTINE))


def test_a_different_model_moves_nothing(saved):
  """A shape mismatch fails every checkpoint alike: nothing is quarantined."""
  other = _state(0)
  other["params"]["w"] = jnp.zeros((128, 256))
  ckpt = _reopen(saved)
  with pytest.raises(checkpoints.CheckpointError, match="no intact checkpoint"):
    ckpt.restore_latest_good(_abstract(other))
  assert ckpt.all_steps() == [2, 4, 6]


def test_half_written_save_is_never_the_latest(saved):
  """A save killed before orbax's final rename leaves a temporary directory only."""
  partial = os.path.join(saved, "8.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "_METADATA"), "w") as f:
    f.write("{")
  ckpt = _reopen(saved)
  assert ckpt.latest_step() == 6
  _, data = ckpt.restore_latest_good(_abstract(_state(0)))
  assert data["batches_consumed"] == 6


def test_empty_directory_restores_nothing(tmp_path):
  assert _reopen(str(tmp_path / "none")).restore_latest_good(_abstract(_state(0))) is None


def test_async_save_makes_its_directories_before_returning(tmp_path):
  """Directory creation is not left to the background (orbax 0.12 can race there,
  failing multi-host saves with FileExistsError); only the array writes are."""
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1, async_save=True)
  try:
    assert ckpt.save(1, _state(1), {"batches_consumed": 1})
    made = set(os.listdir(tmp_path))
    assert made & {"1", "1.orbax-checkpoint-tmp"}, made
    step_dir = os.path.join(tmp_path, "1" if "1" in made else "1.orbax-checkpoint-tmp")
    items = {name.split(".")[0] for name in os.listdir(step_dir)}
    assert {"state", "data"} <= items, items
  finally:
    ckpt.close()
  assert ckpt.all_steps() == [1]
