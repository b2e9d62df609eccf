"""Process 0's failures reach every process (no process waits forever at a barrier):
`trainer._on_process_0` as the export uses it, with two processes simulated."""
import jax
import pytest

from ankh3_jax import config as config_lib
from ankh3_jax.training import run_settings
from ankh3_jax.training import trainer


@pytest.fixture(name="processes")
def _processes(monkeypatch):
  """Makes this process look like process `index` of 2; returns the broadcast log."""
  sent = []

  def become(index, code_from_0=0):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(trainer, "_host_params", lambda params: params)

    def broadcast(value):
      sent.append(int(value))
      return value if index == 0 else code_from_0
    monkeypatch.setattr(trainer.multihost_utils, "broadcast_one_to_all", broadcast)
  return become, sent


def _export(tmp_path, run_id="this-run"):
  config = config_lib.preset("tiny")
  return trainer.export_model(str(tmp_path), config, {"unused": 0}, run_id, 10)


def test_export_refused_on_process_0_is_raised_on_every_process(tmp_path, processes):
  become, sent = processes
  (tmp_path / "model").mkdir()
  (tmp_path / "model" / "weights.bin").write_text("a user's file")  # not our export
  become(0)
  with pytest.raises(run_settings.RunSettingsError):
    _export(tmp_path)
  assert sent == [1]  # process 0 told the others which error it had
  become(1, code_from_0=1)
  with pytest.raises(run_settings.RunSettingsError, match="exporting the model failed on "
                     "process 0"):
    _export(tmp_path)
  assert (tmp_path / "model" / "weights.bin").read_text() == "a user's file"


def test_other_processes_write_nothing_and_return_after_process_0(tmp_path, processes):
  become, sent = processes
  become(1, code_from_0=0)
  assert _export(tmp_path) == str(tmp_path / "model")
  assert sent == [0] and not (tmp_path / "model").exists()
