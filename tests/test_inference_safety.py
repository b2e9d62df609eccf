"""ankh3-embed, ankh3-complete, finetune and ankh3-ablation against bad flags, outputs
they must not touch, other writers and readers, and a full disk (docs/reliability.md,
"Outputs, inputs and flags")."""
import argparse
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ankh3_jax import complete
from ankh3_jax import config as config_lib
from ankh3_jax import embed
from ankh3_jax import inference_memory
from ankh3_jax import model as model_lib
from ankh3_jax import model_io
from ankh3_jax import output_paths
from ankh3_jax.data import fasta

CONFIG = config_lib.preset("tiny")
RECORDS = [("a", "MKVLAT"), ("b", "GGSWQ"), ("c", "MKVLATRRE"), ("d", "PPPP"),
           ("e", "ACDEFGHIKLMNPQRSTVWY")]


def one_error_line(text: str) -> str:
  assert "Traceback" not in text, text
  lines = [line for line in text.splitlines() if "error:" in line]
  assert len(lines) == 1, text
  return lines[0]


def _params(seed: int):
  tokens = np.ones((1, 8), np.int32)
  return model_lib.Transformer(CONFIG).init(jax.random.key(seed), tokens, tokens, tokens,
                                            enable_dropout=False)["params"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """Two model directories whose token embeddings are equal and whose encoders differ in
  one layer (a fine-tune with frozen embeddings)."""
  root = tmp_path_factory.mktemp("models")
  params = jax.tree_util.tree_map(np.array, model_io.as_plain_params(_params(0)))
  tuned = jax.tree_util.tree_map(np.copy, params)
  tuned["encoder"]["layers_1"]["mlp"]["wo"]["kernel"] *= 1.01
  paths = str(root / "base"), str(root / "tuned")
  model_io.save_model(paths[0], CONFIG, params)
  model_io.save_model(paths[1], CONFIG, tuned)
  return paths


@pytest.fixture
def fasta_path(tmp_path):
  path = str(tmp_path / "in.fasta")
  fasta.write_fasta(path, RECORDS)
  return path


def _embed(model_dir, fasta_path, out, *extra):
  return embed.main(["--model_dir", model_dir, "--fasta", fasta_path, "--output", out,
                     "--no-progress", "--token_budget", "16", *extra])


# ------------------------------------------------------------------------------- embed


def test_resume_with_another_encoder_is_refused(models, fasta_path, tmp_path, capsys):
  base, tuned = (embed.Embedder(m) for m in models)
  assert np.array_equal(base.loaded.params["token_embedder"]["embedding"],
                        tuned.loaded.params["token_embedder"]["embedding"])
  assert base.fingerprint() != tuned.fingerprint()
  out = str(tmp_path / "out.h5")
  fasta.write_fasta(fasta_path, RECORDS[:2])
  assert _embed(models[0], fasta_path, out) == 0
  fasta.write_fasta(fasta_path, RECORDS)
  before = embed.read_embeddings(out)
  assert _embed(models[1], fasta_path, out) == 2
  assert "existing output was written with model=" in one_error_line(capsys.readouterr().err)
  after = embed.read_embeddings(out)
  assert set(after) == {"a", "b"}
  assert all(np.array_equal(after[k].per_protein, before[k].per_protein) for k in before)
  assert _embed(models[1], fasta_path, out, "--overwrite") == 0  # asked for: afresh
  after = embed.read_embeddings(out)
  assert set(after) == {r for r, _ in RECORDS}
  assert not np.array_equal(after["a"].per_protein, before["a"].per_protein)


def test_output_in_use_by_a_writer_or_a_reader(models, fasta_path, tmp_path, capsys):
  out = str(tmp_path / "out.h5")
  with output_paths.OutputLock(out, "ankh3-embed"):
    assert _embed(models[0], fasta_path, out) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{out} is in use: ankh3-embed pid {os.getpid()} is writing it" in line
  assert not os.path.exists(out) and not os.path.exists(output_paths.lock_path(out))

  fasta.write_fasta(fasta_path, RECORDS[:2])
  assert _embed(models[0], fasta_path, out) == 0
  fasta.write_fasta(fasta_path, RECORDS)
  reader = subprocess.Popen(
      [sys.executable, "-c", "import h5py, sys, time; f = h5py.File(sys.argv[1], 'r'); "
       "print('open', flush=True); time.sleep(120)", out], stdout=subprocess.PIPE, text=True)
  try:
    assert reader.stdout.readline().strip() == "open"
    assert _embed(models[0], fasta_path, out) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "is in use: another program holds it open" in line and "delete" not in line
  finally:
    reader.kill()
    reader.wait()
  assert _embed(models[0], fasta_path, out) == 0  # closed there: the job resumes
  assert set(embed.read_embeddings(out)) == {r for r, _ in RECORDS}


def test_nearly_full_disk_keeps_finished_records_and_resumes(models, fasta_path, tmp_path,
                                                            capsys, monkeypatch):
  reference = str(tmp_path / "reference.h5")
  assert _embed(models[0], fasta_path, reference) == 0
  out = str(tmp_path / "out.h5")
  real_statvfs, calls = os.statvfs, []

  class NearlyFull:  # room for two batches, then 1 KiB
    def __init__(self, path):
      calls.append(path)
      self.f_frsize, self.f_bavail = 1, (1 << 40) if len(calls) <= 2 else 1024

  monkeypatch.setattr(os, "statvfs", NearlyFull)
  assert _embed(models[0], fasta_path, out) == 2
  line = one_error_line(capsys.readouterr().err)
  assert "the disk is nearly full (0.00 MiB free" in line
  assert "the 2 records finished are kept: free space and rerun to resume" in line
  assert len(embed.read_embeddings(out)) == 2  # closed cleanly, readable
  monkeypatch.setattr(os, "statvfs", real_statvfs)
  assert _embed(models[0], fasta_path, out) == 0
  want, got = embed.read_embeddings(reference), embed.read_embeddings(out)
  assert set(got) == set(want)
  for rid, emb in want.items():
    np.testing.assert_array_equal(got[rid].per_residue, emb.per_residue)


def test_full_tmpfs_end_to_end(models, tmp_path):
  """The real command on a 1 MiB tmpfs (where mounting is allowed): it stops before the
  disk is full, the file holds the finished records, and the job resumes elsewhere."""
  disk = tmp_path / "disk"
  disk.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                    capture_output=True, check=False).returncode != 0:
    pytest.skip("mounting a tmpfs is not permitted here")
  try:
    rng = np.random.default_rng(0)
    path = str(tmp_path / "many.fasta")
    fasta.write_fasta(path, [(f"r{i}", "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 100)))
                             for i in range(40)])
    argv = ["--model_dir", models[0], "--fasta", path, "--no-progress", "--token_budget",
            "512"]
    proc = subprocess.run([sys.executable, "-m", "ankh3_jax.embed", *argv, "--output",
                           str(disk / "out.h5")], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "the disk is nearly full" in one_error_line(proc.stderr)
    kept = embed.read_embeddings(str(disk / "out.h5"))
    assert 0 < len(kept) < 40
    shutil.copy(disk / "out.h5", tmp_path / "out.h5")
  finally:
    subprocess.run(["umount", str(disk)], check=True)
  assert embed.main([*argv, "--output", str(tmp_path / "out.h5")]) == 0
  assert len(embed.read_embeddings(str(tmp_path / "out.h5"))) == 40


def test_length_cap_by_default_and_memory_check(models, tmp_path, capsys):
  path, out = str(tmp_path / "long.fasta"), str(tmp_path / "out.h5")
  fasta.write_fasta(path, [("ok", "MKV"), ("titin_like", "A" * 5000)])
  assert _embed(models[0], path, out) == 2
  line = one_error_line(capsys.readouterr().err)
  assert "record 'titin_like': sequence longer than max_length=4096" in line
  assert "raise it with --max_length N" in line
  fasta.write_fasta(path, [("ok", "MKV"), ("huge", "A" * 300_000)])
  assert _embed(models[0], path, out, "--max_length", "400000") == 2
  line = one_error_line(capsys.readouterr().err)
  assert "record 'huge' (300000 residues) needs about" in line and "available" in line
  assert not os.path.exists(out)


def test_embed_never_writes_over_its_input(models, tmp_path, capsys):
  path = str(tmp_path / "in.h5")  # a FASTA with an output's name
  fasta.write_fasta(path, RECORDS)
  with open(path, "rb") as f:
    before = f.read()
  assert _embed(models[0], path, path, "--overwrite") == 2
  assert "is the input" in one_error_line(capsys.readouterr().err)
  with open(path, "rb") as f:
    assert f.read() == before


# ---------------------------------------------------------------------------- complete


def _fake_completions(texts):
  def fake(model, prompts, **kwargs):
    del model, kwargs
    return [complete.Completion(t, (), -1.0, -1.0, True) for t in texts[:len(prompts)]]
  return fake


def test_complete_checks_its_output_before_generating(models, tmp_path, capsys, monkeypatch):
  def must_not_run(*args, **kwargs):
    raise AssertionError("generation started")

  monkeypatch.setattr(complete, "complete", must_not_run)
  argv = ["--model_dir", models[0], "--prompt", "MKV"]
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  cases = {str(tmp_path / "missing" / "out.fasta"): "does not exist",
           str(blocker / "out.fasta"): "does not exist",
           str(tmp_path): "is a directory"}
  for output, reason in cases.items():
    assert complete.main(argv + ["--output", output]) == 2
    assert reason in one_error_line(capsys.readouterr().err)
  assert complete.main(argv + ["--output", str(blocker)]) == 2
  assert "already exists" in one_error_line(capsys.readouterr().err)
  assert blocker.read_text() == "x"
  monkeypatch.setattr(complete, "complete", _fake_completions(["AAA"]))
  assert complete.main(argv + ["--output", str(blocker), "--overwrite"]) == 0
  assert [r.sequence for r in fasta.read_fasta(str(blocker))] == ["MKVAAA"]


def test_empty_continuations_are_reported(models, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(complete, "complete", _fake_completions(["", "GG", ""]))
  out = str(tmp_path / "out.fasta")
  assert complete.main(["--model_dir", models[0], "--prompt", "MKV", "--prompt", "MK",
                        "--prompt", "M", "--continuation_only", "--output", out]) == 0
  err = capsys.readouterr().err
  assert ("2 of 3 record(s) have an empty continuation (eos came first) and are not in "
          f"{out}: prompt_0, prompt_2") in err
  assert [(r.id, r.sequence) for r in fasta.read_fasta(out)] == [("prompt_1", "GG")]


def test_max_new_tokens_beyond_memory(models, capsys):
  assert complete.main(["--model_dir", models[0], "--prompt", "MKV",
                        "--max_new_tokens", "1000000000"]) == 2
  line = one_error_line(capsys.readouterr().err)
  assert "max_new_tokens=1000000000 needs about" in line and "new tokens fit" in line


# ------------------------------------------------------------- numeric flags, property


NUMBERS = st.one_of(st.integers(-2 ** 70, 2 ** 70), st.integers(-3, 300),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(
                        [0, 1, -1, 0.0, 1.0, 1e-7, 2 ** 31, 2 ** 32, float("nan")]))
COMPLETE_FLAGS = ("--max_new_tokens", "--batch_size", "--num_beams", "--top_k", "--seed",
                  "--max_length", "--temperature", "--top_p", "--length_penalty", "--cut")
EMBED_FLAGS = ("--token_budget", "--max_length", "--buckets")


def _parse(parser: argparse.ArgumentParser, argv, capsys):
  """Parsed args, or None after checking argparse's refusal is one error line."""
  try:
    return parser.parse_args(argv)
  except SystemExit as e:
    assert e.code == 2
    one_error_line(capsys.readouterr().err)
    return None


def _flag_values(draw_dict) -> list:
  return [item for flag, value in draw_dict.items() for item in (flag, str(value))]


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(COMPLETE_FLAGS), NUMBERS, max_size=4),
       st.sampled_from(complete.STRATEGIES))
def test_complete_flags_work_or_fail_in_one_line(capsys, flags, strategy):
  argv = ["--model_dir", "m", "--prompt", "MKV", "--strategy", strategy, *_flag_values(flags)]
  args = _parse(complete.build_parser(), argv, capsys)
  if args is None:
    return
  try:
    complete.check_flags(args)
    complete.check_memory(CONFIG, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, num_beams=args.num_beams,
                          strategy=args.strategy)
  except ValueError as e:
    assert "\n" not in str(e) and str(e)
    return
  # Accepted: every value is one the decode loop computes with correctly.
  for name in ("max_new_tokens", "batch_size", "num_beams", "max_length"):
    assert 1 <= getattr(args, name) < 2 ** 31, name
  assert 0 <= args.top_k < 2 ** 31 and 0 <= args.seed < 2 ** 32
  assert math.isfinite(args.temperature) and float(np.float32(args.temperature)) > 0
  assert math.isfinite(args.top_p) and 0 < args.top_p <= 1
  assert math.isfinite(args.length_penalty) and np.isfinite(np.float32(args.length_penalty))
  assert args.cut is None or 0 < args.cut <= 1
  rows = args.batch_size * (args.num_beams if strategy == "beam" else 1)
  assert (inference_memory.decode_bytes(CONFIG, rows, args.max_new_tokens)
          <= inference_memory.available_bytes())


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(EMBED_FLAGS), NUMBERS, max_size=3))
def test_embed_flags_work_or_fail_in_one_line(capsys, flags):
  argv = ["--model_dir", "m", "--fasta", "f", "--output", "o.h5", *_flag_values(flags)]
  args = _parse(embed.build_parser(), argv, capsys)
  if args is None:
    return
  try:
    embed.check_flags(args)
  except ValueError as e:
    assert "\n" not in str(e) and str(e)
    return
  assert 1 <= args.token_budget < 2 ** 31
  assert args.max_length is None or 1 <= args.max_length < 2 ** 31
  assert args.buckets is None or 3 <= args.buckets[0] <= args.buckets[-1] < 2 ** 31


@pytest.mark.parametrize("command, flags, in_process", [
    ("complete", ["--batch_size", "-3"], False),
    ("complete", ["--length_penalty", "nan"], True),
    ("embed", ["--token_budget", "0"], False),
])
def test_bad_flags_end_to_end(models, fasta_path, tmp_path, capsys, command, flags,
                              in_process):
  """The real commands: exit 2, one line, no output file (one real process per command;
  further cases call the same `main(argv)` in this process)."""
  out = str(tmp_path / ("out.fasta" if command == "complete" else "out.h5"))
  argv = ["--model_dir", models[0], "--fasta", fasta_path, "--output", out, *flags]
  if in_process:
    code = {"complete": complete.main, "embed": embed.main}[command](argv)
    stderr = capsys.readouterr().err
  else:
    proc = subprocess.run([sys.executable, "-m", f"ankh3_jax.{command}", *argv],
                          capture_output=True, text=True, timeout=300, check=False)
    code, stderr = proc.returncode, proc.stderr
  assert code == 2, stderr
  assert flags[0][2:] in one_error_line(stderr)
  assert sorted(os.listdir(tmp_path)) == ["in.fasta"]


# ------------------------------------------------------------------ finetune, ablation


def test_finetune_output_json_is_checked_before_training(tmp_path, capsys):
  from ankh3_jax.downstream import finetune  # pylint: disable=g-import-not-at-top

  existing = tmp_path / "results.json"
  existing.write_text("{\"mine\": 1}\n")
  argv = ["--task", "ss3", "--features", "onehot", "--output_json", str(existing)]
  assert finetune.main(argv) == 2
  assert "already exists" in one_error_line(capsys.readouterr().err)
  assert finetune.main(["--task", "ss3", "--features", "onehot", "--output_json",
                        str(tmp_path / "no" / "r.json")]) == 2
  assert "does not exist" in one_error_line(capsys.readouterr().err)
  assert existing.read_text() == "{\"mine\": 1}\n"


def test_ablation_leaves_pages_and_directories_it_did_not_write(tmp_path, capsys,
                                                                monkeypatch):
  from ankh3_jax.ablation import report  # pylint: disable=g-import-not-at-top
  from ankh3_jax.ablation import run  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(run, "collect", lambda *a: pytest.fail("work started"))
  args, _ = run.parse_args(["--out_dir", str(tmp_path / "out")])
  assert args.doc == os.path.join(str(tmp_path / "out"), "ablation.md")  # not docs/
  users = tmp_path / "users"
  users.mkdir()
  (users / "notes.md").write_text("mine\n")
  assert run.main(["--out_dir", str(users)]) == 2
  assert "holds files this command did not write" in one_error_line(capsys.readouterr().err)
  page = tmp_path / "page.md"
  page.write_text("# My own page\n")
  assert run.main(["--out_dir", str(tmp_path / "new"), "--doc", str(page)]) == 2
  assert "was not written by ankh3-ablation" in one_error_line(capsys.readouterr().err)
  assert page.read_text() == "# My own page\n" and (users / "notes.md").read_text() == "mine\n"
  page.write_text(report.TITLE + "\n\nolder results\n")
  report.check_page_paths(str(page))  # ours: rewritten on the next run
  monkeypatch.chdir(tmp_path)
  with pytest.raises(output_paths.OutputError, match="working directory"):
    report.check_page_paths(os.path.join(".", "x", ".."))
