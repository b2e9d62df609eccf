"""A benchmark script's `--json OUT`: checked before the work, written whole after it."""
import argparse
import json
from typing import Optional

from ankh3_jax import output_paths


def check_json_out(parser: argparse.ArgumentParser, path: Optional[str],
                   overwrite: bool = False) -> None:
  """Stops with a usage error, before any measuring, if `path` cannot be written."""
  if path:
    try:
      output_paths.check_output_file(path, overwrite=overwrite, what="--json")
    except output_paths.OutputError as e:
      parser.error(str(e))


def emit(record: dict, path: Optional[str]) -> None:
  """Prints `record` as one JSON line and, with `path`, writes that line there atomically."""
  line = json.dumps(record)
  print(line)
  if path:
    with output_paths.atomic_file(path) as f:
      f.write(line + "\n")
