"""Every notebook's code cells run, in order, in a fresh Python process with no network.

`ANKH3_NOTEBOOK_TEST=1` makes the notebooks use tiny local models and few steps. Lines
that are IPython shell/magic commands (`!pip ...`, `%...`) only appear in the Colab-only
install cell; they become `pass` here.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
SLOW = {"quickstart.ipynb", "pretrain_tiny.ipynb",
        "finetune_secondary_structure.ipynb"}  # each > 30 s on 2 cores
TIMEOUT_S = 900


def notebook_script(path: str) -> str:
  """The code cells of a notebook as one script (IPython-only lines made `pass`)."""
  with open(path, encoding="utf-8") as f:
    notebook = json.load(f)
  assert notebook["nbformat"] == 4, path
  parts = []
  for number, cell in enumerate(notebook["cells"]):
    if cell["cell_type"] != "code":
      continue
    source = "".join(cell["source"])
    lines = []
    for line in source.splitlines():
      stripped = line.lstrip()
      if stripped.startswith(("!", "%")):
        line = line[:len(line) - len(stripped)] + "pass"
      lines.append(line)
    parts.append(f"# --- cell {number}\n" + "\n".join(lines))
  return "\n\n".join(parts) + "\n"


def _params():
  names = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))
  return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def test_all_expected_notebooks_exist():
  names = set(os.listdir(NOTEBOOKS))
  assert {"quickstart.ipynb", "finetune_secondary_structure.ipynb",
          "pretrain_tiny.ipynb"} <= names


@pytest.mark.parametrize("name", _params())
def test_notebook_runs(name, tmp_path):
  path = os.path.join(NOTEBOOKS, name)
  with open(path, encoding="utf-8") as f:
    first = next(c for c in json.load(f)["cells"] if c["cell_type"] == "code")
  assert "google.colab" in "".join(first["source"])  # the guarded Colab install cell
  script = tmp_path / (name + ".py")
  script.write_text(notebook_script(path))
  env = dict(os.environ, ANKH3_NOTEBOOK_TEST="1", HF_HUB_OFFLINE="1",
             TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             MPLBACKEND="Agg", TMPDIR=str(tmp_path))
  done = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env,
                        capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
  print(done.stdout[-3000:])
  assert done.returncode == 0, f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
