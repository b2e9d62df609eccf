"""Nothing lost, nothing silently wrong: the conversion and inference commands against
outputs they must not replace, their own inputs, non-finite weights and bad configs
(docs/reliability.md, "Outputs, inputs and flags")."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ankh3_jax import config as config_lib
from ankh3_jax import convert
from ankh3_jax import model as model_lib
from ankh3_jax import model_io
from ankh3_jax import output_paths
from ankh3_jax.hf import weights as hf_weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(config, params, our model directory, an HF export of it) of a tiny random model."""
  config = config_lib.preset("tiny")
  params = model_lib.init_params(config)
  root = tmp_path_factory.mktemp("safety")
  model_dir, hf_dir = str(root / "model"), str(root / "hf")
  model_io.save_model(model_dir, config, params)
  convert.export_hf(config, params, hf_dir)
  return config, params, model_dir, hf_dir


def snapshot(directory) -> dict:
  """Relative path -> sha256 of every file under `directory` (symlinks not followed)."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def cli(module: str, *args, cwd=None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"ankh3_jax.{module}", *args],
                        capture_output=True, text=True, cwd=cwd, timeout=600, check=False)


def one_error_line(text: str) -> str:
  assert "Traceback" not in text, text
  lines = [line for line in text.splitlines() if "error:" in line]
  assert len(lines) == 1, text
  return lines[0]


def user_directory(path) -> str:
  os.makedirs(path)
  with open(os.path.join(path, "thesis.txt"), "w", encoding="utf-8") as f:
    f.write("four years of work\n")
  return str(path)


# ---------------------------------------------------------------------------- data loss


def test_export_into_a_users_directory_keeps_it(tiny, tmp_path):
  precious = user_directory(tmp_path / "precious")
  before = snapshot(precious)
  proc = cli("convert", "export", tiny[2], precious)
  assert proc.returncode == 1
  assert "holds files this command did not write (thesis.txt)" in one_error_line(proc.stderr)
  assert snapshot(precious) == before
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".precious")]  # no temp left
  # Asked for, the directory is replaced.
  assert convert.main(["export", tiny[2], precious, "--overwrite"]) == 0
  assert "thesis.txt" not in os.listdir(precious) and convert.is_hf_export(precious)


def test_export_to_the_working_directory_is_refused_even_with_overwrite(tiny, tmp_path,
                                                                         capsys, monkeypatch):
  work = user_directory(tmp_path / "w")
  shutil.copytree(tiny[2], os.path.join(work, "m"))
  before = snapshot(work)
  monkeypatch.chdir(work)  # in process: the real command ran in the test above
  assert convert.main(["export", "m", ".", "--overwrite"]) == 1
  assert "working directory" in one_error_line(capsys.readouterr().err)
  assert snapshot(work) == before


def test_commands_never_write_over_their_input(tiny, tmp_path, capsys, monkeypatch):
  model_dir = str(tmp_path / "m")
  shutil.copytree(tiny[2], model_dir)
  hf_dir = str(tmp_path / "hf")
  shutil.copytree(tiny[3], hf_dir)
  os.symlink(model_dir, tmp_path / "alias")
  before = snapshot(tmp_path)
  cases = [["export", model_dir, model_dir], ["import", hf_dir, hf_dir],
           ["export", model_dir, str(tmp_path)],           # the directory holding the input
           ["export", model_dir, str(tmp_path / "alias")],  # the input by another name
           ["import", hf_dir, hf_dir, "--overwrite"]]
  for argv in cases:
    assert convert.main(argv) == 1, argv
    line = one_error_line(capsys.readouterr().err)
    assert "is the input" in line or "contains the input" in line, (argv, line)
  monkeypatch.chdir(model_dir)
  assert convert.main(["export", ".", os.path.join("..", "..")]) == 1
  assert "working directory" in one_error_line(capsys.readouterr().err)
  assert snapshot(tmp_path) == before


def test_outputs_we_wrote_are_replaced_others_only_with_overwrite(tiny, tmp_path):
  config, params, model_dir, hf_dir = tiny
  # Our own earlier outputs: replaced without --overwrite.
  for _ in range(2):
    assert convert.main(["export", model_dir, str(tmp_path / "hf")]) == 0
    assert convert.main(["import", hf_dir, str(tmp_path / "ours")]) == 0
  assert model_io.is_model_directory(str(tmp_path / "ours"))
  # A Hub download has the same file names, but transformers' version in its config.
  with open(os.path.join(tmp_path / "hf", "config.json"), encoding="utf-8") as f:
    hub = {**json.load(f), "transformers_version": "4.51.0"}
  with open(os.path.join(tmp_path / "hf", "config.json"), "w", encoding="utf-8") as f:
    json.dump(hub, f)
  before = snapshot(tmp_path / "hf")
  assert convert.main(["export", model_dir, str(tmp_path / "hf")]) == 1
  assert snapshot(tmp_path / "hf") == before
  # save_model: a model directory with a user's file in it is not ours any more.
  target = str(tmp_path / "ours")
  with open(os.path.join(target, "notes.txt"), "w", encoding="utf-8") as f:
    f.write("mine\n")
  before = snapshot(target)
  with pytest.raises(output_paths.OutputError, match="notes.txt"):
    model_io.save_model(target, config, params)
  assert snapshot(target) == before
  model_io.save_model(target, config, params, overwrite=True)
  assert sorted(os.listdir(target)) == ["config.json", "params", "spiece.model"]
  with pytest.raises(output_paths.OutputError, match="contains the input"):  # its vocabulary
    model_io.save_model(target, config, params,
                        vocab_path=os.path.join(target, "spiece.model"), overwrite=True)


# ------------------------------------------------------------------- silent wrong results


def test_import_rejects_non_finite_weights(tiny, tmp_path, capsys):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

  hf_dir = str(tmp_path / "hf")
  shutil.copytree(tiny[3], hf_dir)
  path = os.path.join(hf_dir, hf_weights.SAFETENSORS_FILE)
  state = load_file(path)
  state["encoder.block.0.layer.0.SelfAttention.q.weight"][0, 0] = np.nan
  state["decoder.final_layer_norm.weight"][:2] = np.inf
  save_file(state, path, metadata={"format": "pt"})
  assert convert.main(["import", hf_dir, str(tmp_path / "out")]) == 1
  line = one_error_line(capsys.readouterr().err)
  assert "non-finite" in line
  assert "decoder.final_layer_norm.weight (2 of" in line
  assert "encoder.block.0.layer.0.SelfAttention.q.weight (1 of" in line
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("edit, named", [
    ({"d_model": "32"}, "d_model='32'"),
    ({"num_layers": -1}, "num_layers=-1"),
    ({"num_heads": 2.5}, "num_heads=2.5"),
    ({"vocab_size": True}, "vocab_size=True"),
    ({"layer_norm_epsilon": "small"}, "layer_norm_epsilon='small'"),
    ({"dropout_rate": 1.5}, "dropout_rate=1.5"),
    ({"feed_forward_proj": ["gated-gelu"]}, "feed_forward_proj=['gated-gelu']"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings='yes'"),
    ({"architectures": "T5EncoderModel"}, "architectures='T5EncoderModel'"),
])
def test_import_names_a_bad_config_value(tiny, tmp_path, capsys, edit, named):
  hf_dir = str(tmp_path / "hf")
  shutil.copytree(tiny[3], hf_dir)
  config_path = os.path.join(hf_dir, "config.json")
  with open(config_path, encoding="utf-8") as f:
    hf_cfg = {**json.load(f), **edit}
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump(hf_cfg, f)
  assert convert.main(["import", hf_dir, str(tmp_path / "out")]) == 1
  line = one_error_line(capsys.readouterr().err)
  assert f"{config_path}: {named}, expected" in line


def test_import_config_that_is_not_an_object(tiny, tmp_path, capsys):
  hf_dir = str(tmp_path / "hf")
  shutil.copytree(tiny[3], hf_dir)
  with open(os.path.join(hf_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(["t5"], f)
  assert convert.main(["import", hf_dir, str(tmp_path / "out")]) == 1
  assert "expected a JSON object, got list" in one_error_line(capsys.readouterr().err)
