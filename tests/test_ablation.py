"""Pre-training ablation: experiment gin files, token counting, probes' burial target,
SVG plots, the results table and verdicts, and the whole command on a tiny budget."""
import json
import math
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from ankh3_jax import plots
from ankh3_jax.ablation import EXPERIMENTS
from ankh3_jax.ablation import pretrain
from ankh3_jax.ablation import report
from ankh3_jax.ablation import stats
from ankh3_jax.ablation import tokens
from ankh3_jax.gin_files import gin_config_dirs

SVG = "{http://www.w3.org/2000/svg}"
# Bindings that must be the same in every experiment (queried after parsing each file).
SHARED_BINDINGS = (
    "%TRAIN_STEPS", "%BATCH_SIZE", "%TASK_FEATURE_LENGTHS", "%SEED",
    "ankh3_jax.config.preset.name",
    "ankh3_jax.training.trainer.train.optimizer",
    "ankh3_jax.training.trainer.train.loss_config",
    "ankh3_jax.training.optimizers.make_schedule.name",
    "ankh3_jax.training.optimizers.make_schedule.peak_learning_rate",
    "ankh3_jax.training.optimizers.make_schedule.warmup_steps",
    "ankh3_jax.training.losses.LossConfig.z_loss",
    "ankh3_jax.training.trainer.train.eval_every",
    "ankh3_jax.training.seqio_data.SeqioSource.eval_task_names",
    "ankh3_jax.training.seqio_data.SeqioSource.max_eval_batches",
    "ankh3_jax.training.seqio_data.SeqioSource.pack",
    "ankh3_jax.data.preprocessors.complete_sequence.split_fraction",
)


# ------------------------------------------------------------------------ gin experiments


def test_experiment_files_are_an_objective_plus_the_shared_base():
  directory = os.path.join(gin_config_dirs()[0], "experiments")
  for name in EXPERIMENTS:
    with open(os.path.join(directory, f"{name}.gin"), encoding="utf-8") as f:
      lines = [l.strip() for l in f if l.strip() and not l.startswith("#")]
    assert lines == [f"include 'objectives/{name}.gin'", "include 'experiments/base.gin'"]


def test_experiments_bind_the_same_budget_and_differ_in_the_objective():
  import gin  # pylint: disable=g-import-not-at-top
  shared, settings = {}, {}
  for name in EXPERIMENTS:
    settings[name] = pretrain.settings(name)
    pretrain._parse(name, [])  # pylint: disable=protected-access
    shared[name] = {b: gin.query_parameter(b) for b in SHARED_BINDINGS}
    gin.clear_config()
  for name in EXPERIMENTS:
    assert shared[name] == shared["ankh3"], name
    for key in ("model_preset", "feature_lengths", "train_steps", "batch_size", "seed",
                "pack", "eval_tasks"):
      assert settings[name][key] == settings["ankh3"][key], (name, key)
  assert settings["ankh3"]["eval_tasks"] == [
      "ankh3_mlm_p15", "ankh3_mlm_p20", "ankh3_mlm_p30", "ankh3_completion"]
  rates = {n: {t: pytest.approx(r) for t, r in s["task_rates"].items()}
           for n, s in settings.items()}
  assert rates["mlm15_only"] == {"ankh3_mlm_p15": 1.0}
  assert rates["mlm_multi"] == {f"ankh3_mlm_p{p}": 1 / 3 for p in (15, 20, 30)}
  assert rates["completion_only"] == {"ankh3_completion": 1.0}
  assert rates["ankh3"] == {**{f"ankh3_mlm_p{p}": 1 / 6 for p in (15, 20, 30)},
                            "ankh3_completion": 0.5}
  # Overrides reach the settings (the command's --train_steps).
  assert pretrain.settings("ankh3", ["TRAIN_STEPS=7"])["train_steps"] == 7


def test_train_command_names_the_experiment_file_and_overrides():
  cmd = pretrain.train_command("mlm_multi", "/tmp/x", 5, ["BATCH_SIZE=8"])
  assert "--gin_file=experiments/mlm_multi.gin" in cmd
  assert cmd[-2:] == ["--gin.TRAIN_STEPS=5", "--gin.BATCH_SIZE=8"]


# ------------------------------------------------------------------------ token counting


def _packed_batch():
  """2 rows: row 0 packs sequences 1 and 2, row 1 holds one sequence and padding."""
  return {
      "encoder_input_tokens": np.array([[5, 6, 7, 8, 9, 10], [5, 6, 7, 0, 0, 0]]),
      "encoder_segment_ids": np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 0, 0, 0]]),
      "decoder_target_tokens": np.array([[3, 4, 3, 0], [3, 0, 0, 0]]),
      "decoder_loss_weights": np.array([[1, 1, 1, 0], [1, 0, 0, 0]]),
  }


def test_count_batch():
  assert tokens.count_batch(_packed_batch()) == {
      "input_tokens": 9, "target_tokens": 4, "sequences": 3, "rows": 2,
      "padded_positions": 20}


class _FakeSource:
  feature_lengths = {"inputs": 6, "targets": 4}

  def describe(self):
    return {"source": "fake"}

  def train_batches(self, layout, start_batch=0):
    del layout
    for i in range(start_batch, 100):
      batch = _packed_batch()
      batch["encoder_input_tokens"] = batch["encoder_input_tokens"] * 0 + i + 1
      yield batch


def test_token_counting_source_counts_consumed_batches_from_the_start(tmp_path):
  source = tokens.TokenCountingSource(_FakeSource(), str(tmp_path))
  assert source.describe() == {"source": "fake"}  # delegated
  assert source.feature_lengths == {"inputs": 6, "targets": 4}
  stream = source.train_batches(None)
  [next(stream) for _ in range(3)]
  stream.close()
  counts = tokens.read_counts(str(tmp_path))
  assert counts["batches"] == 3 and counts["input_tokens"] == 3 * 12
  # A resumed stream yields the same batches as skipping, and counts the skipped ones.
  stream = source.train_batches(None, start_batch=3)
  assert next(stream)["encoder_input_tokens"][0, 0] == 4
  stream.close()
  assert tokens.read_counts(str(tmp_path))["batches"] == 4
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


# ------------------------------------------------------------------------ probes


def test_burial_counts():
  from ankh3_jax.ablation import probes  # pylint: disable=g-import-not-at-top
  cb = np.array([[0, 0, 0], [5, 0, 0], [9, 0, 0], [30, 0, 0]], np.float32)
  # Within 10 A: 0-1, 0-2, 1-2; residue 3 is alone.
  np.testing.assert_array_equal(probes.burial_counts(cb), [2, 2, 2, 0])
  np.testing.assert_array_equal(probes.burial_counts(cb, radius=6.0), [1, 2, 1, 0])


# ------------------------------------------------------------------------ figures


def test_line_panels_draw_a_line_per_series_and_valid_svg():
  fig = plots.line_panels(
      "Loss & <curves>", [("train", {"a<b": [(0, 3.0), (10, 2.0), (20, 1.5)],
                                     "c": [(0, 3.2), (20, 1.0)]}),
                          ("eval", {"a<b": [(0, 4.0), (20, float("nan")), (30, 2.0)],
                                    "c": [(20, 2.5)]})],
      ["a<b", "c"], x_label="step", columns=3)
  train, evaluation = fig.axes
  assert [l.get_label() for l in train.get_lines()] == ["a<b", "c"]
  assert train.get_lines()[0].get_color() == evaluation.get_lines()[0].get_color()
  assert list(evaluation.get_lines()[0].get_xdata()) == [0, 30]  # nan dropped
  assert evaluation.get_lines()[1].get_marker() == "o"  # a lone point: a dot
  assert train.get_xlabel() == "step"
  assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a<b", "c"]
  svg = plots.svg_text(fig)
  root = ET.fromstring(svg)
  assert root.tag == f"{SVG}svg" and svg == plots.svg_text(fig)  # same bytes again
  texts = "".join(t.text or "" for t in root.iter(f"{SVG}text"))
  assert "Loss & <curves>" in texts and "a<b" in texts and "step" in texts


def test_point_panels_draw_means_error_bars_seeds_and_references():
  panels = [("Q3", {"x": (0.5, 0.1, [0.4, 0.5, 0.6]), "y": (0.45, None, [0.45])},
             ("majority", 0.37)),
            ("P@L/5", {"x": (0.08, 0.01, [0.07, 0.09])}, None),
            ("far", {"x": (0.5, 0.01, [0.5])}, ("base", 9.0))]
  q3, p5, far = plots.point_panels("probes", panels, ["x", "y"]).axes
  assert [c.get_label() for c in q3.containers] == ["x: 0.5000 +- 0.1000 (n=3)",
                                                    "y: 0.4500 (n=1)"]
  bars = q3.containers[0].lines[2][0].get_segments()[0]  # the mean -+ spread
  np.testing.assert_allclose(bars[:, 1], [0.4, 0.6])
  assert q3.containers[1].lines[2] == ()  # no spread, no bar
  assert [len(c.get_offsets()) for c in q3.collections if c.get_offsets().ndim == 2
          and c.get_alpha() == 0.55] == [3, 1]
  dashed = lambda ax: [l for l in ax.get_lines() if l.get_linestyle() == "--"]
  assert len(dashed(q3)) == 1 and dashed(q3)[0].get_ydata()[0] == 0.37
  assert not dashed(p5) and not dashed(far)
  assert any("base: 9 (off scale)" == t.get_text() for t in far.texts)
  low, high = far.get_ylim()
  assert low <= 0.49 and high >= 0.51 and high < 1  # not stretched to the reference


# ------------------------------------------------------------------------ report


def test_mean_std():
  four = stats.mean_std([1.0, 2.0, 3.0, 4.0])
  assert four["mean"] == pytest.approx(2.5)
  assert four["std"] == pytest.approx(math.sqrt(5 / 3))  # sample std (n - 1)
  assert stats.mean_std([0.7])["std"] is None
  assert report.format_cell(stats.mean_std([0.7])) == "0.7000"
  assert report.format_cell(None) == "-"


def _results(ankh3_q3, mlm_q3):
  """A results dict with two runs and a reference, probe scores as given per seed."""
  probes = {
      "mlm15_only": {"ss3": {str(i): {"metric": v} for i, v in enumerate(mlm_q3)}},
      "ankh3": {"ss3": {str(i): {"metric": v} for i, v in enumerate(ankh3_q3)}},
      "random_init": {"ss3": {"0": {"metric": 0.45}, "1": {"metric": 0.47}}},
  }
  return {
      "experiments": {"mlm15_only": {}, "ankh3": {}},
      "feature_sets": [{"name": "mlm15_only", "label": "`mlm15_only`"},
                       {"name": "ankh3", "label": "`ankh3`"},
                       {"name": "random_init", "label": "random init"}],
      "summary": stats.summarize(probes),
      "baselines": {"ss3": {"name": "majority class", "value": 0.3727}},
  }


def test_results_table_shows_mean_and_std_per_feature_set():
  table = report.results_table(_results([0.4, 0.5, 0.6], [0.5, 0.5, 0.5])).splitlines()
  assert table[0] == "| encoder (frozen) | Q3 |"
  assert table[2] == "| `mlm15_only` | 0.5000 ± 0.0000 |"
  assert table[3] == "| `ankh3` | 0.5000 ± 0.1000 |"
  assert table[4] == "| random init | 0.4600 ± 0.0141 |"
  assert table[5] == "| trivial baseline | 0.3727 (majority class) |"


def test_comparisons_weigh_differences_against_the_seed_spread():
  clear = report.comparisons(_results([0.60, 0.61, 0.62], [0.50, 0.51, 0.52]))
  assert len(clear) == 1 and "ranking `ankh3` > `mlm15_only`" in clear[0]
  assert "best single objective (`mlm15_only`): +0.1000" in clear[0]
  assert "(outside 2x)" in clear[0]
  noisy = report.comparisons(_results([0.50, 0.60, 0.70], [0.52, 0.55, 0.58]))
  assert "(within 2x)" in noisy[0]


# ------------------------------------------------------------------------ the command


def test_out_dir_with_other_settings_is_refused(tmp_path, capsys):
  from ankh3_jax.ablation import run  # pylint: disable=g-import-not-at-top
  with open(tmp_path / "settings.json", "w", encoding="utf-8") as f:
    json.dump({"train_steps": 5, "bindings": [], "probes": {}}, f)
  assert run.main(["--out_dir", str(tmp_path), "--train_steps", "6"]) == 2
  assert "other settings" in capsys.readouterr().err
  assert run.main(["--experiments", "bert"]) == 2
  assert run.main(["--gin.TRAIN_STEPS"]) == 2  # a binding without its value
  assert "--gin.NAME=VALUE" in capsys.readouterr().err


def test_bindings_are_split_as_the_trainer_splits_them():
  from ankh3_jax import main  # pylint: disable=g-import-not-at-top
  from ankh3_jax.ablation import run  # pylint: disable=g-import-not-at-top
  argv = ["--seeds", "1", "--gin.TRAIN_STEPS", "5", "--gin.BATCH_SIZE=8"]
  assert run.parse_args(argv)[1] == main.parse_args(argv[2:])[1] == ["TRAIN_STEPS=5",
                                                                     "BATCH_SIZE=8"]


@pytest.mark.slow
def test_ablation_command_end_to_end_and_resume(tmp_path, capsys):
  """Two experiments x 5 steps, two probe seeds on a few chains; then a rerun reuses
  everything."""
  from ankh3_jax.ablation import run  # pylint: disable=g-import-not-at-top
  doc = tmp_path / "doc" / "ablation.md"
  argv = ["--out_dir", str(tmp_path / "out"), "--experiments", "mlm15_only,ankh3",
          "--seeds", "0,1", "--train_steps", "5", "--probe_steps", "4",
          "--probe_train_limit", "24", "--probe_test_limit", "6", "--no_references",
          "--doc", str(doc),
          "--gin.ankh3_jax.training.seqio_data.SeqioSource.max_eval_batches=1",
          "--gin.ankh3_jax.training.seqio_data.SeqioSource.eval_task_names="
          "['ankh3_completion']"]
  assert run.main(argv) == 0
  results = json.loads((tmp_path / "doc" / "ablation.json").read_text())
  assert results == json.loads((tmp_path / "out" / "results.json").read_text())
  assert list(results["experiments"]) == ["mlm15_only", "ankh3"]
  for name, exp in results["experiments"].items():
    assert exp["run"]["tokens"]["batches"] == 5, name
    assert exp["run"]["tokens"]["rows"] == 5 * 16
    assert exp["run"]["train_curve"] and exp["run"]["eval_curves"]["ankh3_completion/loss"]
    final = exp["run"]["final_eval"]  # residue metrics first: every run on every task
    assert final["ankh3_completion/residue_loss"] > 0
    assert final["ankh3_completion/gap_unigram_ci_low"] <= final["ankh3_completion/gap_unigram"]
  for name in ("mlm15_only", "ankh3"):
    for task in ("ss3", "ss8", "contacts", "burial"):
      stats = results["summary"][name][task]
      assert stats["n"] == 2 and math.isfinite(stats["mean"]) and math.isfinite(stats["std"])
  text = doc.read_text()
  assert "ablation_losses.svg" in text and "ablation_probes.svg" in text
  assert "| `ankh3` |" in text and "nan" not in text.lower()
  assert "completion: CE (gap vs unigram [95% CI])" in text and "| *unigram baseline* |" in text
  for svg in ("ablation_losses.svg", "ablation_probes.svg"):
    assert ET.parse(tmp_path / "doc" / svg).getroot().tag == f"{SVG}svg"

  capsys.readouterr()
  assert run.main(argv) == 0
  err = capsys.readouterr().err
  assert err.count("already trained") == 2
  again = json.loads((tmp_path / "out" / "results.json").read_text())
  assert again["reused"] == {"pre-trainings": 2, "probes": 2 * 4 * 2}
  assert again["summary"] == results["summary"]
  assert [i["reused"]["pre-trainings"] for i in again["invocations"]] == [0, 2]
  assert again["work"] == {"pre-trainings": 0, "probes": 0}
  assert "1 later invocation(s) only re-rendered" in doc.read_text()


# ------------------------------------------------------------------------ probing one model


def test_probe_command_scores_a_model_beside_every_reference(tmp_path, capsys):
  """`ankh3-ablation probe`: the model, its random init, one-hot and the one-hot window,
  each probed with the same head and seed; the table, the JSON, and no overwriting."""
  from ankh3_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from ankh3_jax import model_io  # pylint: disable=g-import-not-at-top
  from ankh3_jax.ablation import run  # pylint: disable=g-import-not-at-top
  from ankh3_jax.config import preset  # pylint: disable=g-import-not-at-top
  config = preset("tiny")
  model_dir = str(tmp_path / "tiny")
  model_io.save_model(model_dir, config, model_lib.init_params(config, seed=1))
  out = tmp_path / "probes.json"
  argv = ["probe", "--model", model_dir, "--out", str(out), "--seeds", "0",
          "--probe_steps", "3", "--probe_train_limit", "4", "--probe_test_limit", "2",
          "--tasks", "ss3"]
  assert run.main(argv) == 0
  printed = capsys.readouterr().out
  results = json.loads(out.read_text())
  names = ["model", "random_init", "onehot", "onehot_window"]
  assert [f["name"] for f in results["feature_sets"]] == names
  dims = {"model": config.d_model, "random_init": config.d_model, "onehot": 25,
          "onehot_window": 15 * 25}
  for name in names:
    record = results["probes"][name]["ss3"]["0"]
    assert record["feature_dim"] == dims[name], name
    assert 0.0 <= record["metric"] <= 1.0 and record["metric_name"] == "Q3"
    assert results["summary"][name]["ss3"] == stats.mean_std([record["metric"]])
  assert results["baselines"]["ss3"]["name"] == "majority class"
  assert results["probe_data"] == {"train_chains": 4, "test_chains": 2,
                                   "test_residues": results["probe_data"]["test_residues"]}
  table = (tmp_path / "probes.md").read_text()
  assert printed == table
  rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ")]
  assert rows == ["| encoder (frozen)", "| model (frozen encoder)",
                  "| random init (same config, `model.init_params` seed 0)",
                  "| one-hot residues (no encoder)", "| one-hot window ±7 residues (no encoder)",
                  "| trivial baseline"]
  assert table.splitlines()[0] == f"# Linear probes of `{os.path.abspath(model_dir)}`"
  assert "| encoder (frozen) | Q3 |" in table and "nan" not in table.lower()

  before = out.read_text()  # a rerun refuses to replace its outputs, before any work
  assert run.main(argv) == 2
  assert "already exists" in capsys.readouterr().err and out.read_text() == before
  assert run.main(["probe", "--model", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
  assert "config.json is missing" in capsys.readouterr().err
  assert run.main(["probe", "--model", model_dir, "--out", str(tmp_path / "x.md")]) == 2
  assert run.main(["probe", "--model", model_dir, "--out", str(tmp_path / "x.json"),
                   "--probe_train_limit", "0"]) == 2
  assert "--probe_train_limit must be positive" in capsys.readouterr().err
  assert not (tmp_path / "x.json").exists() and not (tmp_path / "x.md").exists()
