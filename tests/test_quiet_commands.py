"""Commands print their own progress, results and warnings, not the libraries' logs.

Each command runs once, cheaply, in a subprocess (all at once, to keep the wall time down),
with the test session's environment minus TF_CPP_MIN_LOG_LEVEL (a user's shell does not set
it). Bound: MAX_STDERR_LINES = 5 lines of stderr per command. The most any of these prints
of its own is 4 (ankh3-train: gin files, process settings, MODEL_DIR, the error); before
`ankh3_jax.quiet` an import printed 35 lines of orbax / JAX INFO and a TensorFlow command
6-7 lines of oneDNN / cudart / cuInit. `--verbose` brings the library logs back.
"""
import logging
import os
import re
import subprocess
import sys

import pytest

from ankh3_jax import quiet

MAX_STDERR_LINES = 5
NOISE = re.compile(r"^[IWE]\d{4} |oneDNN|cudart|cuInit|absl::InitializeLog|orbax|"
                   r"Unable to initialize backend|TF_ENABLE_ONEDNN_OPTS", re.MULTILINE)
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny model in our format and as a Hugging Face export, and a 2-record FASTA."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from ankh3_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ankh3_jax import convert, model_io  # pylint: disable=g-import-not-at-top
  from ankh3_jax.model import init_params  # pylint: disable=g-import-not-at-top

  directory = tmp_path_factory.mktemp("quiet")
  config = config_lib.preset("tiny")
  params = nn.unbox(init_params(config))
  model_io.save_model(str(directory / "model"), config, params)
  convert.export_hf(config, params, str(directory / "hf"))
  (directory / "two.fasta").write_text(">a\nMKTAYIAKQR\n>b\nGSHMLEDPV\n")
  return directory


COMMANDS = {
    "convert": ["ankh3-convert", "import", "hf", "imported"],
    "embed": ["ankh3-embed", "--model_dir", "model", "--fasta", "two.fasta",
              "--output", "emb.h5"],
    "complete": ["ankh3-complete", "--model_dir", "model", "--prompt", "MKTAYIAK",
                 "--max_new_tokens", "4"],
    # Imports TensorFlow (seqio) and starts JAX, then stops at a configuration error.
    "train": ["ankh3-train", "--no-huge_pages", "--gin.MODEL_DIR=run",
              "--gin.TRAIN_FASTA='two.fasta'"],
    # Imports TensorFlow, then stops at an unknown experiment.
    "ablation": ["ankh3-ablation", "--experiments", "none", "--out_dir", "abl"],
    # Imports JAX and the downstream heads, then stops at the missing CSV (named).
    "finetune": ["ankh3-finetune", "--model_dir", "model", "--task", "fitness",
                 "--data_csv", "missing.csv"],
    "convert_verbose": ["ankh3-convert", "import", "hf", "imported_verbose", "--verbose"],
}
EXPECTED_CODES = {"train": 2, "ablation": 2, "finetune": 2}


@pytest.fixture(scope="module")
def runs(workdir):
  """{name: (returncode, stdout, stderr)} of COMMANDS, run concurrently."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  procs = {name: subprocess.Popen([os.path.join(BIN, argv[0]), *argv[1:]], cwd=workdir,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
           for name, argv in COMMANDS.items()}
  return {name: (proc.wait(timeout=600), *proc.communicate()) for name, proc in procs.items()}


@pytest.mark.slow  # seven commands at once: 100 s wall at load ~7 on 2 cores, 51 s of CPU
@pytest.mark.parametrize("name", [n for n in COMMANDS if not n.endswith("_verbose")])
def test_command_stderr_is_short(runs, name):
  code, stdout, stderr = runs[name]
  assert code == EXPECTED_CODES.get(name, 0), (stdout, stderr)
  lines = stderr.splitlines()
  assert len(lines) <= MAX_STDERR_LINES, stderr
  assert not NOISE.search(stderr), stderr


@pytest.mark.slow
def test_commands_still_report(runs):
  assert "wrote imported" in runs["convert"][2]
  assert "2 written" in runs["embed"][1]
  assert runs["complete"][1].startswith(">prompt_0 ")
  assert "TRAIN_FASTA='two.fasta' needs VALIDATION_FASTA" in runs["train"][2]
  assert "--experiments: unknown experiment 'none'" in runs["ablation"][2]


@pytest.mark.slow
def test_verbose_shows_library_logs(runs):
  code, _, stderr = runs["convert_verbose"]
  assert code == 0
  assert len(stderr.splitlines()) > 10 and "orbax" in stderr, stderr


def test_setup_quiets_library_loggers_unless_verbose(monkeypatch):
  monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
  import absl.logging  # pylint: disable=g-import-not-at-top,unused-import
  for name in quiet.LIBRARY_LOGGERS:  # restored after the test
    monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
  logger = logging.getLogger("orbax")
  monkeypatch.setattr(logger, "level", logging.NOTSET)
  assert quiet.setup(["import", "a", "b", "--verbose"]) is True
  assert logger.level == logging.NOTSET
  monkeypatch.setenv(quiet.VERBOSE_ENV, "1")
  assert quiet.setup([]) is True and logger.level == logging.NOTSET
  monkeypatch.setenv(quiet.VERBOSE_ENV, "0")
  assert quiet.setup([]) is False
  assert logger.level == logging.WARNING and logging.getLogger("absl").level >= logging.WARNING


def test_native_stderr_silenced_hides_file_descriptor_2(capfd):
  with quiet.native_stderr_silenced():
    os.write(2, b"hidden C++ line\n")
  os.write(2, b"shown\n")
  assert capfd.readouterr().err == "shown\n"
