"""Atomic writes (temporary file, then `os.replace`) and reads of the ablation's files."""
import json
import os

from ankh3_jax import output_paths


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path`: readers see the old file or the whole new one."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with output_paths.atomic_file(path, "w", encoding="utf-8") as f:
    f.write(text)


def write_json(path: str, value) -> None:
  write_text(path, json.dumps(value, indent=2) + "\n")


def read_json(path: str, default=None):
  """The JSON value in `path`, or `default` if there is no such file."""
  if not os.path.exists(path):
    return default
  with open(path, encoding="utf-8") as f:
    return json.load(f)
