"""Ablation runs with their own pre-training seeds (`ankh3@1`): labels, the pooled probe
spreads, the pre-training noise of the residue cross-entropy, and the page built on them."""
import copy
import json
import math
import os

import pytest

from ankh3_jax.ablation import pretrain
from ankh3_jax.ablation import report
from ankh3_jax.ablation import stats
from ankh3_jax.ablation import run
from ankh3_jax.ablation import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_labels_name_experiment_seed_and_directory():
  assert runs.parse("ankh3") == ("ankh3", None)
  assert runs.parse("mlm15_only@12") == ("mlm15_only", 12)
  assert runs.directory("ankh3") == "ankh3" and runs.directory("ankh3@1") == "ankh3-seed1"
  assert runs.bindings("ankh3") == [] and runs.bindings("ankh3@1") == ["SEED=1"]
  assert runs.ordered(["ankh3@1", "completion_only", "ankh3", "mlm15_only@2"]) == [
      "mlm15_only@2", "completion_only", "ankh3", "ankh3@1"]
  for bad in ("ankh4", "ankh3@", "ankh3@-1", "ankh3@one"):
    with pytest.raises(ValueError, match="ankh3"):
      runs.parse(bad)


def test_command_line_rejects_bad_or_repeated_runs_and_passes_gin_files():
  args, _ = run.parse_args(["--experiments", "ankh3,ankh3@1", "--gin_file=a.gin"])
  assert args.experiments == ["ankh3", "ankh3@1"] and args.gin_file == ["a.gin"]
  for bad in ("ankh3,ankh3", "ankh3@1,ankh3@01", "ankh3@x"):
    with pytest.raises(run.UsageError, match="--experiments"):
      run.parse_args(["--experiments", bad])
  cmd = pretrain.train_command("ankh3", "/m", None, ["SEED=1"], ["experiments/x.gin"])
  assert cmd.index("--gin_file=experiments/ankh3.gin") < cmd.index(
      "--gin_file=experiments/x.gin") and cmd[-1] == "--gin.SEED=1"


def test_reference_scale_gin_sets_the_reference_budget_and_the_seed_binding_wins():
  s = pretrain.settings("mlm15_only", runs.bindings("mlm15_only@3"),
                        ["experiments/reference_scale.gin"])
  assert (s["seed"], s["train_steps"], s["batch_size"]) == (3, 4000, 32)
  assert s["extra_gin_files"] == ["experiments/reference_scale.gin"]
  assert s["task_rates"] == {"ankh3_mlm_p15": 1.0}


def _probe(values):
  return {str(i): {"metric": v} for i, v in enumerate(values)}


def test_pool_puts_an_objectives_seeds_together_and_leaves_references_alone():
  probes = {"ankh3": {"ss3": _probe([0.50, 0.52])}, "ankh3@1": {"ss3": _probe([0.56, 0.58])},
            "onehot": {"ss3": _probe([0.40, 0.40])}}
  pooled = stats.pool(probes)
  assert set(pooled) == {"ankh3", "onehot"}
  assert pooled["ankh3"]["ss3"]["n"] == 4
  assert pooled["ankh3"]["ss3"]["mean"] == pytest.approx(0.54)
  # pre-training seeds widen the spread beyond either run's probe seeds
  assert pooled["ankh3"]["ss3"]["std"] > 2 * stats.summarize(probes)["ankh3"]["ss3"]["std"]
  assert pooled["onehot"]["ss3"]["std"] == 0.0


def _seeded_results(residue):
  """Four real runs (the 500-step ablation's results, kept in tests/data) with a second
  seed of ankh3 and mlm15_only and residue cross-entropies `residue` {label: value} on
  MLM 15 %."""
  with open(os.path.join(REPO, "tests", "data", "ablation_500_steps.json"),
            encoding="utf-8") as f:
    results = json.load(f)
  for label in ("ankh3@1", "mlm15_only@1"):
    base = runs.experiment(label)
    results["experiments"][label] = copy.deepcopy(results["experiments"][base])
    results["experiments"][label]["settings"]["seed"] = 1
    results["probes"][label] = {t: {s: {**r, "metric": r["metric"] + 0.01}
                                    for s, r in by_seed.items()}
                                for t, by_seed in results["probes"][base].items()}
    results["feature_sets"].append({"name": label, "label": f"`{label}`", "short": label})
  for label, value in residue.items():
    final = results["experiments"][label]["run"]["final_eval"]
    final.update({"ankh3_mlm_p15/residue_loss": value, "ankh3_mlm_p15/gap_unigram": 0.0,
                  "ankh3_mlm_p15/gap_unigram_ci_low": 0.0,
                  "ankh3_mlm_p15/gap_unigram_ci_high": 0.0,
                  "ankh3_mlm_p15/unigram_loss": 2.9, "ankh3_mlm_p15/composition_loss": 2.86})
  results["shared"]["seeds"] = {n: e["settings"]["seed"]
                                for n, e in results["experiments"].items()}
  results["summary"] = stats.summarize(results["probes"])
  results["pooled"] = stats.pool(results["probes"])
  return results


def test_seed_noise_and_the_smallest_detectable_difference():
  residue = {"ankh3": 2.80, "ankh3@1": 2.82, "mlm15_only": 2.85, "mlm15_only@1": 2.83,
             "mlm_multi": 2.84, "completion_only": 2.95}
  results = _seeded_results(residue)
  noise = stats.seed_noise(results, "ankh3_mlm_p15")
  std = math.sqrt((2 * 0.01 ** 2 + 2 * 0.01 ** 2) / 2)  # two pairs, one df each
  assert noise["df"] == 2 and noise["std"] == pytest.approx(std)
  assert noise["detectable"] == pytest.approx(4.3027 * std, rel=1e-4)  # t(0.975, 2)
  assert noise["spreads"] == pytest.approx({"mlm15_only": 0.02, "ankh3": 0.02})
  assert stats.seed_noise(results, "ankh3_completion") is None
  assert stats.detectable(noise, 2, 1) == pytest.approx(4.3027 * std * math.sqrt(1.5),
                                                         rel=1e-4)
  line = report.residue_comparisons(results)[0]
  # ankh3 (mean 2.81, 2 seeds) - best single (mlm15_only, mean 2.84, 2 seeds) = -0.03,
  # within 0.061
  assert ("`ankh3` - best single objective (`mlm15_only`): -0.030 nats, within the "
          "smallest detectable difference 0.061 for 2 against 2 seed(s)") in line
  results["experiments"]["ankh3@1"]["run"]["final_eval"]["ankh3_mlm_p15/residue_loss"] = 2.60
  line = report.residue_comparisons(results)[0]
  assert "`ankh3` 2.700" in line and "beyond" not in line  # the seeds now disagree by 0.2


def test_page_with_seed_runs_reports_every_run_and_the_pooled_comparisons():
  residue = {"ankh3": 2.70, "ankh3@1": 2.71, "mlm15_only": 2.85, "mlm15_only@1": 2.86,
             "mlm_multi": 2.84, "completion_only": 2.95}
  results = _seeded_results(residue)
  text = " ".join(report.render(results, "l.svg", "p.svg").split())  # unwrapped
  for label in ("`ankh3@1`", "`mlm15_only@1`"):
    assert text.count(label) >= 3  # setup table, probe table, residue table
  # ankh3 2.705 (2 seeds) - mlm_multi 2.84 (1 seed) = -0.135; std 0.0071, 2 df: 0.037
  assert ("-0.135 nats, beyond the smallest detectable difference 0.037 for 2 against 1 "
          "seed(s)") in text
  assert "pre-training seeds (initialisation, data order, masks) per run" in text
  assert "`mlm_multi`, `completion_only` had one pre-training seed" in text
  assert "ankh3@1" in report.probes_svg(results) and "ankh3@1" in report.losses_svg(results)
  results["experiments"]["ankh3@1"]["run"].update(train_seconds=780.0, resumed_from_step=2500)
  table = report.setup_table(results)
  assert "13.0 min (last invocation only: resumed at step 2,500)" in table
  assert table.count("last invocation only") == 1
  text = " ".join(report.render(results, "l.svg", "p.svg").split())
  assert "`ankh3@1` also trained in earlier, interrupted invocations" in text


def test_cells_whose_format_pre_training_never_showed_are_left_out():
  """Coverage decides, not the score: MLM at a rate shows every sparser rate's sentinel
  ids, completion only completion."""
  assert stats.shows_format("ankh3_mlm_p30", "ankh3_mlm_p20")
  assert not stats.shows_format("ankh3_mlm_p15", "ankh3_mlm_p20")
  assert stats.shows_format("user_mlm_p12_5", "ankh3_mlm_p12_5")
  assert stats.shows_format("ankh3_mlm_sampled", "ankh3_mlm_p30")
  assert not stats.shows_format("ankh3_completion", "ankh3_mlm_p15")
  assert not stats.shows_format("ankh3_mlm_p30", "ankh3_completion")
  residue = {"ankh3": 2.86, "ankh3@1": 2.87, "mlm15_only": 2.87, "mlm15_only@1": 2.86,
             "mlm_multi": 2.86, "completion_only": 2.50}  # better than unigram: still out
  results = _seeded_results(residue)
  assert stats.unseen_format(results, "ankh3_mlm_p15") == {"completion_only"}
  assert stats.unseen_format(results, "ankh3_mlm_p30") == {"completion_only", "mlm15_only"}
  assert stats.unseen_format(results, "ankh3_completion") == {"mlm15_only", "mlm_multi"}
  lines = report.unseen_format_lines(results)
  assert len(lines) == 1 and lines[0].endswith(  # the results score MLM 15 % only
      "`completion_only` on MLM 15 % (2.500 nats, -0.40 against unigram).")
  text = " ".join(report.render(results, "l.svg", "p.svg").split())
  assert "coverage of the format, not context" in text
  # Left out of the noise and of the comparison.
  for label, value in {"ankh3": 2.86, "ankh3@1": 2.87, "mlm15_only": 3.3,
                       "mlm15_only@1": 3.6}.items():
    results["experiments"][label]["run"]["final_eval"]["ankh3_mlm_p20/residue_loss"] = value
  assert set(stats.seed_noise(results, "ankh3_mlm_p20")["spreads"]) == {"ankh3"}
  line = report.residue_comparisons(results)[0]
  assert "best single objective (`mlm_multi`)" in line, line
  assert "`completion_only` 2.500 (format never seen)" in line, line
  del results["experiments"]["mlm_multi"]
  line = report.residue_comparisons(results)[1]  # MLM 20 %: ankh3 and mlm15_only
  assert line.startswith("**MLM 20 %**") and "nothing to compare `ankh3` with" in line and "best single" not in line


def _curve(*points):
  return [[step, value] for step, value in points]


def test_held_out_curves_that_rise_again_are_named_and_weighed():
  """A run that over-fits its training sequences is named, and the comparison is also
  made between the curves' lowest points."""
  results = _seeded_results({"ankh3": 2.86, "ankh3@1": 2.87, "mlm15_only": 2.87,
                             "mlm15_only@1": 2.86, "mlm_multi": 2.86,
                             "completion_only": 2.90})
  final = {"ankh3": 2.89, "ankh3@1": 2.88, "completion_only": 3.25, "mlm_multi": 4.7,
           "mlm15_only": 5.4, "mlm15_only@1": 5.2}
  for label, value in final.items():
    run = results["experiments"][label]["run"]
    run["final_eval"].update({
        "ankh3_completion/residue_loss": value, "ankh3_completion/unigram_loss": 2.9,
        **{f"ankh3_completion/gap_unigram{end}": 2.9 - value
           for end in ("", "_ci_low", "_ci_high")}})
    lowest = {"ankh3": 2.862, "ankh3@1": 2.864, "completion_only": 2.870}.get(label, value)
    run["eval_curves"] = {
        "ankh3_completion/residue_loss": _curve((0, 5.9), (500, lowest), (1000, value)),
        "ankh3_completion/residue_loss_ci_low": _curve((1000, value - 0.03)),
        "ankh3_completion/residue_loss_ci_high": _curve((1000, value + 0.03))}
  line = report.held_out_rises(results)[0]
  assert "`completion_only` on completion: lowest 2.870 at step 500, 3.250 at step 1,000 " \
      "(+0.380)" in line, line
  assert "`ankh3` on completion" not in line  # +0.028, within the half-interval 0.03
  assert "mlm_multi" not in line  # its curve is about a format it never saw
  verdict = stats.residue_verdicts(results)["ankh3_completion"]
  assert verdict["best"] == "completion_only"
  assert verdict["diff"] == pytest.approx(2.885 - 3.25)
  assert verdict["best_step_diff"] == pytest.approx(2.863 - 2.870)
  assert abs(verdict["diff"]) > verdict["threshold"] > abs(verdict["best_step_diff"])
  text = " ".join(report.render(results, "l.svg", "p.svg").split())
  assert "beyond it on completion, ahead by 0.365 nats (`completion_only`" in text
  assert "between the lowest points of the held-out curves only -0.007, within it" in text
