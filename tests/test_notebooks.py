"""Every notebook's code cells run, in order, in a fresh Python process with no network.

`ANKH3_NOTEBOOK_TEST=1` makes the notebooks use tiny local models and few steps. Lines
that are IPython shell/magic commands (`!pip ...`, `%...`) only appear in the Colab-only
install cell; they become `pass` here. The selected notebooks run at once (each keeps
about one core busy), each test then checks its own.
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


def _selected_notebooks(session) -> list:
  """The notebooks whose test this session runs (all of them, unless deselected)."""
  return sorted({item.callspec.params["name"] for item in session.items
                 if item.originalname == "test_notebook_runs"})


@pytest.fixture(scope="module")
def notebook_runs(request, tmp_path_factory):
  """{name: (has the Colab cell, process, directory)}: each selected notebook started at
  once in its own directory (stdout.txt, stderr.txt); its test waits for the process."""
  runs = {}
  for name in _selected_notebooks(request.session):
    path = os.path.join(NOTEBOOKS, name)
    with open(path, encoding="utf-8") as f:
      first = next(c for c in json.load(f)["cells"] if c["cell_type"] == "code")
    check = "google.colab" in "".join(first["source"])  # the guarded Colab install cell
    directory = tmp_path_factory.mktemp(name.replace(".", "_"))
    script = directory / (name + ".py")
    script.write_text(notebook_script(path))
    env = dict(os.environ, ANKH3_NOTEBOOK_TEST="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               MPLBACKEND="Agg", TMPDIR=str(directory))
    with open(directory / "stdout.txt", "w") as out, open(directory / "stderr.txt", "w") as err:
      proc = subprocess.Popen([sys.executable, str(script)], cwd=str(directory), env=env,
                              stdout=out, stderr=err)
    runs[name] = (check, proc, directory)
  yield runs
  for _, proc, _ in runs.values():
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.mark.parametrize("name", _params())
def test_notebook_runs(name, notebook_runs):
  has_colab_cell, proc, directory = notebook_runs[name]
  assert has_colab_cell, f"{name}: the first code cell is not the guarded Colab install"
  try:
    code = proc.wait(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    code = f"killed after {TIMEOUT_S} s"
  stdout = (directory / "stdout.txt").read_text()
  stderr = (directory / "stderr.txt").read_text()
  print(stdout[-3000:])
  assert code == 0, f"{name} failed ({code}):\n{stdout[-2000:]}\n{stderr[-4000:]}"
