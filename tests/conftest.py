"""Shared test set-up: quiet TensorFlow, CPU only, one XLA compilation cache per session."""
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# JAX's persistent compilation cache, fresh for each test session and inherited by the
# subprocesses the tests start: the CLI, kill-and-resume, multi-device and notebook tests
# compile the same programs in process after process. A cached executable is the program
# XLA compiled, so results are unchanged (the kill-and-resume test checks bit-identity).
_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="ankh3_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
  """Removes this session's compilation cache (before interpreter exit handlers run)."""
  if _CACHE_DIR is not None:
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)
