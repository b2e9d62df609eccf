"""`ankh3-finetune` on users' CSVs: SS3 with an id column, a ProteinGym-style fitness file
without a split column, bad rows, outputs that are never overwritten by surprise."""
import csv
import json
import os

import numpy as np
import pytest

from ankh3_jax import model as model_lib
from ankh3_jax import model_io
from ankh3_jax.config import preset
from ankh3_jax.downstream import cli
from ankh3_jax.downstream import data
from ankh3_jax.downstream import metrics
from ankh3_jax.downstream import user_data

FAST = ["--steps", "12", "--batch_size", "8", "--head", "linear", "--learning_rate", "1e-2",
        "--length_quantum", "64"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
  """A randomly initialised tiny Ankh3 (no trained weights ship with the repository)."""
  config = preset("tiny")
  path = str(tmp_path_factory.mktemp("finetune_cli") / "tiny")
  model_io.save_model(path, config, model_lib.init_params(config))
  return path


def _write_csv(path, header, rows):
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def _read_csv(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _ss3_rows(n=40, length=60):
  return [(c.id, c.sequence[:length], c.ss3[:length])
          for c in data.load_chains("train", limit=n)]


def test_ss3_on_a_user_csv(tiny_model_dir, tmp_path, capsys):
  path = _write_csv(tmp_path / "mine.csv", ["id", "sequence", "ss3"], _ss3_rows())
  predictions, report = tmp_path / "pred.csv", tmp_path / "result.json"
  argv = ["--task", "ss3", "--model_dir", tiny_model_dir, "--data_csv", path, "--seed", "3",
          "--predictions", str(predictions), "--output_json", str(report), *FAST]
  assert cli.main(argv) == 0
  out, err = capsys.readouterr()
  assert "random split of 40 sequences (seed 3" in err and "32 train, 8 evaluation" in err
  assert "(8 sequences, 32 to train" in out and "proteins" not in out + err
  rows = _read_csv(predictions)
  result = json.loads(report.read_text())[0]
  assert len(rows) == 8 and {r["eval_set"] for r in rows} == {"random split"}
  truth = {i: (s, l) for i, s, l in _ss3_rows()}
  for row in rows:  # predictions line up with the user's own rows and labels
    assert (row["sequence"], row["label"]) == truth[row["id"]]
    assert len(row["prediction"]) == len(row["sequence"]) and set(row["prediction"]) <= set("HEC")
  correct = sum(p == l for r in rows for p, l in zip(r["prediction"], r["label"]))
  total = sum(len(r["label"]) for r in rows)
  assert result["metric_name"] == "Q3" and result["metric"] == pytest.approx(correct / total)
  assert result["train_examples"] == 32 and result["eval_examples"] == 8
  # Same seed, same split; the existing outputs are refused without --overwrite.
  before = predictions.read_text()
  assert cli.main(argv) == 2
  assert "already exists" in capsys.readouterr().err
  assert predictions.read_text() == before
  assert cli.main(argv + ["--overwrite"]) == 0
  assert predictions.read_text() == before


def _variants(n=60, seed=0):
  """ProteinGym-style rows: single mutants of one wild type, a score the residues set."""
  rng = np.random.default_rng(seed)
  wild = data.load_chains("train", limit=1)[0].sequence[:50]
  rows, seen = [], set()
  while len(rows) < n:
    pos, new = int(rng.integers(len(wild))), "ACDEFGHIKLMNPQRSTVWY"[int(rng.integers(20))]
    mutant = f"{wild[pos]}{pos + 1}{new}"
    if new == wild[pos] or mutant in seen:
      continue
    seen.add(mutant)
    seq = wild[:pos] + new + wild[pos + 1:]
    score = (seq.count("W") + seq.count("F")) / len(seq) + 0.01 * rng.normal()
    rows.append((mutant, seq, f"{score:.5f}", int(score > 0.05)))
  return rows


def test_fitness_on_a_proteingym_csv_without_split_column(tiny_model_dir, tmp_path, capsys):
  path = _write_csv(tmp_path / "DMS.csv", ["mutant", "mutated_sequence", "DMS_score",
                                           "DMS_score_bin"], _variants())
  predictions, report = tmp_path / "pred.csv", tmp_path / "result.json"
  assert cli.main(["--task", "fitness", "--model_dir", tiny_model_dir, "--data_csv", path,
                   "--split_seed", "7", "--eval_fraction", "0.25", "--predictions",
                   str(predictions), "--output_json", str(report), *FAST]) == 0
  out, err = capsys.readouterr()
  assert "random split of 60 variants (seed 7" in err and "45 train, 15 evaluation" in err
  assert "(15 variants, 45 to train" in out and "Spearman" in out
  assert "proteins" not in out + err and "sequences" not in out
  rows = _read_csv(predictions)
  scores = {m: float(s) for m, _, s, _ in _variants()}
  assert len(rows) == 15 and all(r["id"] in scores for r in rows)
  assert [float(r["label"]) for r in rows] == pytest.approx([scores[r["id"]] for r in rows],
                                                             abs=1e-5)
  predicted = [float(r["prediction"]) for r in rows]
  result = json.loads(report.read_text())[0]
  assert result["metric"] == pytest.approx(
      metrics.spearman(predicted, [float(r["label"]) for r in rows]), abs=1e-3)
  assert result["baseline"] == 0.0
  # Predictions are in the label's units (de-standardised), not z-scores.
  assert min(predicted) > -1.0 and max(predicted) < 1.0
  # The evaluated rows are the seed's: the library's split of the file's rows.
  train, evaluate = user_data.random_split(list(range(60)), 0.25, 7)
  assert len(train) == 45 and len(evaluate) == 15
  file_rows = _read_csv(path)
  assert sorted(r["id"] for r in rows) == sorted(file_rows[i]["mutant"] for i in evaluate)


@pytest.mark.parametrize("task, header, rows, where, reason", [
    ("ss3", ["sequence", "ss3"], [("MKTAY", "CHHEC"), ("GGSX1", "CCCCC")], "line 3",
     "illegal residue"),
    ("ss3", ["sequence", "ss3"], [("MKTAY", "CHHEC"), ("GGS", "CCCC")], "line 3",
     "ss3 has 4 labels for 3 residues"),
    ("ss8", ["sequence", "ss8"], [("MKTAY", "CHHEC"), ("GGS", "CXC")], "line 3",
     "unknown state"),
    ("fitness", ["mutant", "mutated_sequence", "DMS_score"],
     [("A1G", "GKT", "0.5"), ("A1C", "CKT", "0.1"), ("A1W", "WKT", "n/a")], "line 4",
     "'n/a' in column 'dms_score' is not a number"),
    ("fitness", ["sequence", "target"], [("MKT", "1.0"), ("", "2.0")], "line 3",
     "empty sequence"),
    ("fitness", ["sequence", "target", "set"], [("MKT", "1.0", "train"), ("GGS", "2.0", "")],
     "line 3", "empty value in the split column 'set'"),
])
def test_bad_rows_stop_before_anything_is_written(tmp_path, capsys, task, header, rows,
                                                  where, reason):
  path = _write_csv(tmp_path / "bad.csv", header, rows)
  before = sorted(os.listdir(tmp_path))
  assert cli.main(["--task", task, "--features", "onehot", "--data_csv", path,
                   "--predictions", str(tmp_path / "p.csv"), "--output_json",
                   str(tmp_path / "r.json"), "--steps", "1"]) == 2
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if "error:" in line]
  assert len(lines) == 1 and "Traceback" not in err, err
  assert f"{path}, {where}" in lines[0] and reason in lines[0]
  assert sorted(os.listdir(tmp_path)) == before


def test_split_column_and_given_split(tmp_path, capsys):
  """FLIP's held-out validation rows are neither trained on nor scored; fold columns train
  on the other folds; --eval_csv is the evaluation set of a file without splits."""
  seqs = [c.sequence[:30] for c in data.load_chains("train", limit=12)]
  flip = _write_csv(tmp_path / "flip.csv", ["sequence", "target", "set", "validation"],
                    [(s, i, "test" if i >= 9 else "train", i in (3, 4))
                     for i, s in enumerate(seqs)])
  sets = user_data.from_csv("fitness", flip)
  assert [float(e.label) for e in sets.train] == [0, 1, 2, 5, 6, 7, 8]
  assert [float(e.label) for e in sets.evaluations[0][1]] == [9, 10, 11]
  folds = _write_csv(tmp_path / "folds.csv", ["sequence", "target", "fold"],
                     [(s, i, i % 3) for i, s in enumerate(seqs)])
  sets = user_data.from_csv("fitness", folds, columns=user_data.tasks.CsvColumns(
      split="fold"), eval_split="0")
  assert [float(e.label) for e in sets.evaluations[0][1]] == [0, 3, 6, 9]
  assert len(sets.train) == 8
  plain = _write_csv(tmp_path / "plain.csv", ["sequence", "target"],
                     [(s, i) for i, s in enumerate(seqs)])
  sets = user_data.from_csv("fitness", plain, eval_csv=flip)
  assert len(sets.train) == 12 and sets.evaluations[0][0] == flip
  assert "given split" in sets.split
  assert cli.main(["--task", "fitness", "--features", "onehot", "--data_csv", folds,
                   "--split_column", "fold", "--eval_split", "7"]) == 2
  assert "evaluation split '7'" in capsys.readouterr().err
