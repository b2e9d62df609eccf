"""Finds gin files and parses them with command-line bindings (t5x style).

Gin files are looked up relative to the working directory, then in the shipped
`gin_configs` directory: `ankh3_jax/gin_configs` when installed as package data, else
the repository's top-level `gin_configs` (editable / source checkouts). So
`--gin_file=runs/demo.gin` and `--gin_file=gin_configs/runs/demo.gin` both work, and
`include 'models/tiny.gin'` inside a file resolves the same way.
"""
import contextlib
import importlib.util
import logging
import os
import re
import sys
from typing import Optional, Sequence

import gin

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class GinConfigError(ValueError):
  """A gin file or binding is wrong; the message says which and why."""


def gin_config_dirs() -> list:
  """Existing shipped gin_configs directories, most specific first."""
  candidates = [os.path.join(_PACKAGE_DIR, "gin_configs"),
                os.path.join(os.path.dirname(_PACKAGE_DIR), "gin_configs")]
  return [d for d in candidates if os.path.isdir(d)]


def find_gin_file(name: str, search_dirs: Sequence[str]) -> str:
  """Absolute path of gin file `name` (cwd first, then `search_dirs`)."""
  tried = []
  for base in [os.getcwd(), *search_dirs]:
    for candidate in (name, name + ".gin"):
      path = candidate if os.path.isabs(candidate) else os.path.join(base, candidate)
      tried.append(path)
      if os.path.isfile(path):
        return os.path.abspath(path)
  raise GinConfigError(f"gin file {name!r} not found; looked in: "
                       + ", ".join(dict.fromkeys(os.path.dirname(t) for t in tried)))


def split_gin_flags(argv: Sequence[str]) -> tuple:
  """(other arguments, bindings 'NAME=VALUE') of a command line: `--gin.NAME=VALUE` and
  `--gin.NAME VALUE` are bindings (t5x style), `--gin_file` and the rest are not."""
  bindings, rest = [], []
  argv = list(argv)
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--gin.") and not arg.startswith("--gin_"):
      body = arg[len("--gin."):]
      if "=" not in body and i + 1 < len(argv):
        body, i = f"{body}={argv[i + 1]}", i + 1
      bindings.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, bindings


def _binding(text: str) -> str:
  """`X=value` as a gin binding; a bare word that is not a gin literal becomes a string
  (`--gin.MODEL_DIR=/tmp/run` works without shell-quoting the quotes)."""
  name, sep, value = text.partition("=")
  if not sep:
    raise GinConfigError(f"gin binding {text!r} has no '='; use --gin.NAME=VALUE")
  value = value.strip()
  try:
    gin.config.parse_value(value)
  except (SyntaxError, ValueError):
    if value and value[0] not in "@%'\"([{":
      value = repr(value)
  return f"{name.strip()} = {value}"


class _DropGinPathProbes(logging.Filter):
  """Drops gin's 'Path not found' errors: it probes every include as a Python package
  path before the search directories, and logs each miss at ERROR level."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.pathname.endswith(os.path.join("gin", "resource_reader.py"))
                and record.getMessage().startswith("Path not found"))


@contextlib.contextmanager
def _quiet_gin_probes():
  root, drop = logging.getLogger(), _DropGinPathProbes()
  root.addFilter(drop)  # gin logs through the root logger
  try:
    yield
  finally:
    root.removeFilter(drop)


def _is_file_less_package(name: str) -> bool:
  module = sys.modules.get(name)
  if module is not None:
    return getattr(module, "__file__", None) is None
  try:
    spec = importlib.util.find_spec(name)
  except (ImportError, ValueError):
    return False
  return spec is not None and spec.origin in (None, "namespace")


@contextlib.contextmanager
def _include_dirs_not_importable(names: Sequence[str]):
  """Makes file-less packages called `names` (e.g. a git-ignored runs/) unimportable.

  gin also looks an include such as 'runs/pretrain.gin' up as a Python package 'runs'; a
  plain directory of that name on sys.path (the working directory under `python -m`) is
  a namespace package without a file, on which gin 0.5 fails with a TypeError. A None
  entry in sys.modules makes that lookup an ImportError, which gin skips.
  """
  blocked = [n for n in names if _is_file_less_package(n)]
  saved = {n: sys.modules.get(n) for n in blocked}
  sys.modules.update({n: None for n in blocked})
  try:
    yield
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module


def parse(gin_files: Sequence[str], bindings: Sequence[str],
          extra_search_dirs: Sequence[str] = ()) -> list:
  """Parses `gin_files` then `bindings` ('NAME=VALUE'); returns the files' paths.

  Raises:
    GinConfigError: a file is missing, or a file or binding does not parse or names an
      unknown configurable / parameter.
  """
  search_dirs = [*extra_search_dirs, *gin_config_dirs()]
  for directory in search_dirs:
    gin.add_config_file_search_path(directory)
  paths = [find_gin_file(f, search_dirs) for f in gin_files]
  lines = [_binding(b) for b in bindings]
  try:
    include_dirs = sorted({n for d in search_dirs if os.path.isdir(d)
                           for n in os.listdir(d) if os.path.isdir(os.path.join(d, n))})
    with _quiet_gin_probes(), _include_dirs_not_importable(include_dirs):
      gin.parse_config_files_and_bindings(paths, lines, finalize_config=False)
  except (ValueError, SyntaxError, KeyError, IOError, ImportError) as e:
    raise GinConfigError(f"{type(e).__name__}: {e}") from e
  return paths


def describe_call_error(error: BaseException, entry: str = "train") -> Optional[str]:
  """A user-facing message if `error` is a gin configuration error at call time.

  That is: a required value gin did not supply, or a ValueError/TypeError/KeyError
  raised by a configurable other than `entry` while gin built `entry`'s arguments
  (e.g. SeqioSource's host_mode). Errors raised inside `entry` itself are not
  configuration errors unless it says so.
  """
  text = str(error)
  if "Required bindings" in text or "No values supplied by Gin" in text:
    return text
  if isinstance(error, (ValueError, TypeError, KeyError)):
    called = re.findall(r"In call to configurable '([^']+)'", text)
    if any(name != entry for name in called):
      return text
  return None
