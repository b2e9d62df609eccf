"""Subprocess side of test_learning.py's control run (a helper, not a test module).

  python tests/learning_worker.py control WORKDIR OUT.json

Trains and scores exactly as the in-process runs do (`test_learning.train_and_score`) and
writes the held-out scores as JSON. A training keeps about one core busy, so the control
trains beside the main run instead of after it.
"""
import dataclasses
import json
import pathlib
import sys

import test_learning  # tests/ helper


def main(argv) -> int:
  if len(argv) != 3 or argv[0] != "control":
    print(f"usage: learning_worker.py control WORKDIR OUT.json (got {argv})", file=sys.stderr)
    return 2
  directory, out = pathlib.Path(argv[1]), argv[2]
  directory.mkdir(parents=True, exist_ok=True)
  with test_learning.run_settings():
    scores = test_learning.train_and_score(directory, test_learning.control_chain())
  with open(out, "w", encoding="utf-8") as f:
    json.dump({task: {field: value.item() if hasattr(value, "item") else value  # numpy
                      for field, value in dataclasses.asdict(s).items()}
               for task, s in scores.items()}, f)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
