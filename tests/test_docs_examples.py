"""Every code example of README.md and docs/*.md runs (python and bash blocks).

A block that cannot run here (TPU pod, hub download, hours of training, a fresh install)
is preceded in the markdown by `<!-- docs-test: skip (reason) -->`; the test reports it as
skipped with that reason (`pytest -rs`). Blocks without a language (output, diagrams) are
not code. Each document runs its blocks in order in its own temporary working directory
(documents side by side, DOCUMENTS_AT_ONCE at a time: each block's commands keep about one
core busy), seeded with what the examples name (see `_seed_workspace`):
  runs/demo-20260101-000000/model   a tiny random model, where `ankh3-train` exports
  ckpt/ankh3-large                  the same tiny model, standing in for a converted one
  ckpt/ankh3-large-hf               its Hugging Face export
  proteins.fasta(.gz), prompts.fasta, full.fasta   two shipped proteins (40 residues)
  scripts/, docs/runs/              links to the repository's (run from its root)
python blocks run in a fresh interpreter, bash blocks with `set -euo pipefail` and this
interpreter's bin directory first on PATH (the installed commands).
Time: README + docs (15 blocks run, 21 skipped) take 3.5-3.8 min of CPU (user + sys) on the
2-core machine; one document after another took 9.1 min wall at load average ~9 (12 blocks
then). The runs are marked slow, the parser test is not.
"""
import concurrent.futures
import glob
import gzip
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.md"] + sorted(os.path.relpath(p, ROOT)
                                   for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
LANGUAGES = {"python": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
SKIP_RE = re.compile(r"^<!--\s*docs-test:\s*skip\s*\((.+)\)\s*-->$")
MARKER_RE = re.compile(r"<!--\s*docs-test")
FENCE_RE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
DEMO_MODEL = "runs/demo-20260101-000000/model"
BLOCK_TIMEOUT_S = 600


class Block:
  """One fenced code block: document, first line, language, code, skip reason (or None)."""

  def __init__(self, doc, line, language, code, skip):
    self.doc, self.line, self.language, self.code, self.skip = doc, line, language, code, skip

  @property
  def name(self) -> str:
    return f"{self.doc}:{self.line}"


def parse_blocks(doc: str, text: str) -> list[Block]:
  """The fenced blocks of one markdown text; a skip marker must sit right above a block."""
  lines, blocks, i = text.splitlines(), [], 0
  pending = None  # (line number, reason) of a skip marker waiting for its block
  while i < len(lines):
    stripped = lines[i].strip()
    fence = FENCE_RE.match(lines[i])
    if MARKER_RE.match(stripped):
      match = SKIP_RE.match(stripped)
      if not match or not match.group(1).strip():
        raise ValueError(f"{doc}:{i + 1}: a docs-test marker reads "
                         f"<!-- docs-test: skip (reason) -->, got {stripped!r}")
      pending = (i + 1, match.group(1).strip())
    elif fence:
      start, language = i + 1, fence.group(2).lower()
      i += 1
      body = []
      while i < len(lines) and not lines[i].strip().startswith("```"):
        body.append(lines[i])
        i += 1
      if i == len(lines):
        raise ValueError(f"{doc}:{start}: code block is not closed")
      if pending and language not in LANGUAGES:
        raise ValueError(f"{doc}:{pending[0]}: skip marker above a block that is not code")
      if language in LANGUAGES:
        blocks.append(Block(doc, start, LANGUAGES[language], "\n".join(body) + "\n",
                            pending[1] if pending else None))
      pending = None
    elif stripped and pending:
      raise ValueError(f"{doc}:{pending[0]}: skip marker not right above a code block")
    i += 1
  return blocks


def all_blocks() -> list[Block]:
  blocks = []
  for doc in DOCUMENTS:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
      blocks += parse_blocks(doc, f.read())
  return blocks


BLOCKS = all_blocks()


def test_parser_finds_blocks_and_markers():
  text = ("x\n```python\nprint(1)\n```\n<!-- docs-test: skip (needs a pod) -->\n"
          "```bash\nlaunch/tpu_pod.sh\n```\n```\noutput\n```\n")
  blocks = parse_blocks("t.md", text)
  assert [(b.line, b.language, b.skip) for b in blocks] == [
      (2, "python", None), (6, "bash", "needs a pod")]
  assert blocks[0].code == "print(1)\n"
  with pytest.raises(ValueError, match="t.md:1: skip marker not right above"):
    parse_blocks("t.md", "<!-- docs-test: skip (r) -->\ntext\n```bash\nls\n```\n")
  with pytest.raises(ValueError, match="t.md:1: a docs-test marker"):
    parse_blocks("t.md", "<!-- docs-test: skip -->\n```bash\nls\n```\n")
  # The real documents have code, and every skip says why.
  assert sum(b.skip is None for b in BLOCKS) >= 5
  assert all(b.skip.strip() for b in BLOCKS if b.skip is not None)


def _write_fasta(path: str, records) -> None:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wt") as f:
    for rid, seq in records:
      f.write(f">{rid}\n{seq}\n")


def _seed_workspace(directory: str) -> None:
  """The files the examples name: a tiny model at the documented paths, FASTA inputs."""
  from ankh3_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ankh3_jax import convert, model_io, vocab  # pylint: disable=g-import-not-at-top
  from ankh3_jax.data import fasta  # pylint: disable=g-import-not-at-top
  from ankh3_jax.model import init_params  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  config = config_lib.preset("tiny")
  params = nn.unbox(init_params(config, seed=0))
  for path in (DEMO_MODEL, "ckpt/ankh3-large"):
    model_io.save_model(os.path.join(directory, path), config, params)
  convert.export_hf(config, params, os.path.join(directory, "ckpt/ankh3-large-hf"),
                    vocab_path=vocab.VOCAB_PATH)
  records = []
  for record in fasta.read_fasta(os.path.join(ROOT, "ankh3_jax/assets/corpus/test.fasta.gz")):
    records.append((record.id.split()[0], record.sequence[:40]))
    if len(records) == 2:
      break
  for name in ("proteins.fasta", "proteins.fasta.gz", "prompts.fasta", "full.fasta"):
    _write_fasta(os.path.join(directory, name), records)
  # The repository's scripts and the run records the result pages are drawn from, as the
  # pages' commands name them from the repository root (read-only: linked, not copied).
  os.symlink(os.path.join(ROOT, "scripts"), os.path.join(directory, "scripts"))
  os.makedirs(os.path.join(directory, "docs"))
  os.symlink(os.path.join(ROOT, "docs", "runs"), os.path.join(directory, "docs", "runs"))


@pytest.fixture(scope="session")
def seed_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("docs_seed"))
  _seed_workspace(directory)
  return directory


DOCUMENTS_AT_ONCE = 3  # documents' block chains run side by side (each ~one core)


def _selected_blocks(session) -> list[Block]:
  """The runnable blocks whose test this session runs, in document order."""
  names = {item.callspec.params["block"].name for item in session.items
           if item.originalname == "test_docs_example_runs"}
  return [b for b in BLOCKS if b.skip is None and b.name in names]


def _run_document(blocks: list[Block], directory: str, results: dict, stop) -> None:
  """Runs one document's blocks in order, each result (or error) into its future."""
  for block in blocks:
    if stop.is_set():
      results[block.name].set_exception(RuntimeError("not run: the session ended"))
      continue
    try:
      results[block.name].set_result(run_block(block, directory))
    except BaseException as error:  # pylint: disable=broad-except
      results[block.name].set_exception(error)


@pytest.fixture(scope="session")
def block_runs(seed_dir, tmp_path_factory, request):
  """{block name: future of its CompletedProcess}. Each document gets one working
  directory, seeded once, and runs its blocks there in order; up to DOCUMENTS_AT_ONCE
  documents run at once."""
  by_doc = {}
  for block in _selected_blocks(request.session):
    by_doc.setdefault(block.doc, []).append(block)
  results = {b.name: concurrent.futures.Future() for blocks in by_doc.values() for b in blocks}
  stop = threading.Event()
  pool = concurrent.futures.ThreadPoolExecutor(DOCUMENTS_AT_ONCE)
  # Longest chains first, so that the last to finish starts early.
  for doc, blocks in sorted(by_doc.items(), key=lambda item: -len(item[1])):
    directory = str(tmp_path_factory.mktemp("docs_" + re.sub(r"\W", "_", doc)))
    shutil.copytree(seed_dir, directory, dirs_exist_ok=True)
    pool.submit(_run_document, blocks, directory, results, stop)
  yield results
  stop.set()  # blocks not started yet (a session stopped early) are not run
  pool.shutdown(wait=True)


def run_block(block: Block, directory: str) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  if block.language == "python":
    command = [sys.executable, "-c", block.code]
  else:
    command = ["bash", "-c", "set -euo pipefail\n" + block.code]
  return subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True,
                        timeout=BLOCK_TIMEOUT_S, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_docs_example_runs(block, request):
  if block.skip is not None:
    pytest.skip(f"{block.name}: {block.skip}")
  result = request.getfixturevalue("block_runs")[block.name].result()
  assert result.returncode == 0, (
      f"{block.name} ({block.language}) exited {result.returncode}\n--- code\n{block.code}"
      f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}")
