"""Quiet commands: by default a command shows its own progress, results and warnings.

`setup()`, first thing in a command's `main()` (before TensorFlow, seqio or a JAX backend
starts), hides what the libraries underneath print on every run:
  * TensorFlow / XLA C++ logs, through TF_CPP_MIN_LOG_LEVEL=3 (set only if the user has
    not set it). TensorFlow's import-time lines (oneDNN, cudart, "All log messages before
    absl::InitializeLog()") and its `cuInit` error ignore that variable, so commands that
    use TensorFlow (seqio data) import it in `setup(tensorflow=True)` with the process's
    stderr pointed at /dev/null for the import only, and hide GPUs from TensorFlow (it only
    feeds data; JAX keeps the accelerators), as t5x does;
  * INFO records of library loggers (orbax through absl, JAX's backend probing such as
    "Unable to initialize backend 'tpu'", TensorFlow, etils), which a command's own
    `logging.basicConfig(level=INFO)` would otherwise let through.
Library WARNING and ERROR records still show. `--verbose` (or ANKH3_VERBOSE=1) leaves all
of it as the libraries set it.
"""
import contextlib
import logging
import os
import sys
from typing import Optional, Sequence

VERBOSE_FLAG = "--verbose"
VERBOSE_ENV = "ANKH3_VERBOSE"
# Loggers of the libraries under the commands; their INFO records are not the command's.
LIBRARY_LOGGERS = ("absl", "orbax", "jax", "tensorflow", "etils", "h5py", "urllib3",
                   "filelock", "fsspec", "gcsfs", "google", "transformers", "torch")


def is_verbose(argv: Optional[Sequence[str]] = None) -> bool:
  argv = sys.argv[1:] if argv is None else argv
  return VERBOSE_FLAG in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def native_stderr_silenced():
  """File descriptor 2 goes to /dev/null inside (C++ logs); Python's sys.stderr is kept."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def _import_tensorflow(silenced: bool) -> None:
  """Imports TensorFlow for the data pipeline only (no GPUs), C++ start-up lines hidden if
  `silenced`. A TensorFlow imported earlier (a notebook, a test) is left as it is."""
  if "tensorflow" in sys.modules:
    return
  with native_stderr_silenced() if silenced else contextlib.nullcontext():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # devices already initialised
      pass


def setup(argv: Optional[Sequence[str]] = None, tensorflow: bool = False) -> bool:
  """Quiets library output unless `--verbose` is in `argv` (default sys.argv); returns
  whether verbose. `tensorflow`: the command uses it (see module doc). Safe to call more
  than once."""
  if is_verbose(argv):
    if tensorflow:
      _import_tensorflow(silenced=False)
    return True
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  # absl installs its own logger class for "absl": import it before asking for the logger.
  import absl.logging  # pylint: disable=g-import-not-at-top,unused-import
  for name in LIBRARY_LOGGERS:
    logger = logging.getLogger(name)
    if logger.level < logging.WARNING:
      logger.setLevel(logging.WARNING)
  if tensorflow:
    _import_tensorflow(silenced=True)
  return False


def add_flag(parser) -> None:
  """Adds `--verbose` to an argparse parser (read by `setup`, listed in --help)."""
  parser.add_argument(VERBOSE_FLAG, action="store_true",
                      help="also show the libraries' own logs (TensorFlow, XLA, orbax, JAX "
                           "backend probing); also ANKH3_VERBOSE=1")
