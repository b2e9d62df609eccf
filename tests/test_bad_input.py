"""Bad input through the user-facing commands: each fails with exit code 2 and one
message naming file, record and reason, and leaves no output behind."""
import gzip
import os

import numpy as np
import pytest

from ankh3_jax import complete
from ankh3_jax import config as config_lib
from ankh3_jax import embed
from ankh3_jax import model as model_lib
from ankh3_jax import model_io

LONG = "M" + "ACDEFGHIKLMNPQRSTVWY" * 300  # 6001 residues: beyond every default limit

# name: (file bytes, reason in the message, record named (None: the file as a whole))
BAD_FASTA = {
    "empty_file": (b"", "empty file", None),
    "not_fasta": (b"just some text\nwithout a header\n", "expected a '>' header", None),
    "empty_sequence": (b">a\nMKV\n>b\n>c\nMKV\n", "empty sequence", "b"),
    "illegal_characters": (b">a\nMKV\n>b\nMK1V?\n", "illegal character(s) '1', '?'", "b"),
    "binary_garbage": (bytes(range(256)) * 4, "binary data", None),
    "duplicate_ids": (b">a\nMKV\n>b\nMKV\n>a\nMKK\n", "duplicate record id", "a"),
    "gzip_truncated": (gzip.compress(b">a\n" + "".join(
        np.random.default_rng(0).choice(list("ACDEFGHIKLMNPQRSTVWY"), 3000)).encode()
                                     )[:1000],
                       "corrupt or truncated gzip", None),
}
ENORMOUS = {"embed": "longer than max_length=4096", "complete": "longer than max_length=4096"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  config = config_lib.preset("tiny")
  params = model_lib.init_params(config)
  path = str(tmp_path_factory.mktemp("model") / "model")
  model_io.save_model(path, config, params)
  return path


def _run(command, model_dir, fasta_path, out_path):
  if command == "embed":
    return embed.main(["--model_dir", model_dir, "--fasta", fasta_path, "--output",
                       out_path, "--max_length", "4096", "--no-progress"])
  return complete.main(["--model_dir", model_dir, "--fasta", fasta_path, "--output",
                        out_path, "--max_new_tokens", "4"])


def _check_failure(code, err, path, reason, record, out_dir):
  assert code == 2
  message = [line for line in err.splitlines() if "error:" in line]
  assert len(message) == 1, err
  assert path in message[0] and reason in message[0], message[0]
  if record is not None:
    assert f"record {record!r}" in message[0]
  assert os.listdir(out_dir) == []  # no output, partial or temporary, left behind


@pytest.mark.parametrize("command", ["embed", "complete"])
@pytest.mark.parametrize("case", sorted(BAD_FASTA))
def test_bad_fasta(command, case, model_dir, tmp_path, capsys):
  data, reason, record = BAD_FASTA[case]
  path = str(tmp_path / (f"{case}.fasta.gz" if case.startswith("gzip") else f"{case}.fa"))
  with open(path, "wb") as f:
    f.write(data)
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  suffix = ".h5" if command == "embed" else ".fasta"
  code = _run(command, model_dir, path, str(out_dir / f"result{suffix}"))
  _check_failure(code, capsys.readouterr().err, path, reason, record, str(out_dir))


@pytest.mark.parametrize("command", sorted(ENORMOUS))
def test_enormous_sequence(command, model_dir, tmp_path, capsys):
  path = str(tmp_path / "long.fa")
  with open(path, "w") as f:
    f.write(f">short\nMKV\n>huge\n{LONG}\n")
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  code = _run(command, model_dir, path, str(out_dir / "result.npz"))
  _check_failure(code, capsys.readouterr().err, path, ENORMOUS[command], "huge",
                 str(out_dir))


def test_enormous_prompt_argument(model_dir, capsys):
  code = complete.main(["--model_dir", model_dir, "--prompt", "MKV", "--prompt", LONG])
  assert code == 2
  assert "--prompt prompt_1: 6001 residues, longer than --max_length=4096" in (
      capsys.readouterr().err)


def test_model_dir_that_is_not_a_model(tmp_path, capsys):
  (tmp_path / "in.fa").write_text(">a\nMKV\n")
  (tmp_path / "nomodel").mkdir()
  code = embed.main(["--model_dir", str(tmp_path / "nomodel"), "--fasta",
                     str(tmp_path / "in.fa"), "--output", str(tmp_path / "o.h5"),
                     "--no-progress"])
  assert code == 2
  err = capsys.readouterr().err
  assert str(tmp_path / "nomodel") in err
  assert not (tmp_path / "o.h5").exists()


@pytest.mark.slow
def test_bad_record_in_training_data(tmp_path, capsys):
  """ankh3-train on a FASTA with an illegal record: exit 4 naming file and record."""
  import gin  # pylint: disable=g-import-not-at-top
  from ankh3_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "train.fa")
  rng = np.random.default_rng(0)
  with open(path, "w") as f:
    for i in range(40):
      f.write(f">p{i}\n{''.join(rng.choice(list('ACDEFGHIKLMNPQRSTVWY'), 50))}\n")
    f.write(">broken\nMKV*LL\n")
  try:
    code = main_lib.run([
        "--gin_file=runs/demo.gin", f"--gin.MODEL_DIR={tmp_path / 'run'}",
        "--gin.TRAIN_STEPS=2", "--gin.ankh3_jax.training.trainer.train.eval_every=0",
        "--gin.ankh3_jax.training.trainer.train.progress_bar=False",
        f"--gin.TRAIN_FASTA='{path}'", f"--gin.VALIDATION_FASTA='{path}'",
        "--gin.DATA_PREFIX='bad_input_test'"])
  finally:
    gin.clear_config()
  assert code == main_lib.EXIT_DATA_ERROR
  err = capsys.readouterr().err
  assert f"bad training data: {path}, line 82, record 'broken': illegal character" in err
  assert not (tmp_path / "run" / "model").exists()
