"""The ablation's page: tables, sentences, plots and the markdown file, from the numbers
in `stats`.

Input is the results dictionary `run` assembles (see `run.collect`); nothing here trains
or reads model files, so the page can be re-rendered from a results JSON alone.
"""
import os
import textwrap
from typing import Optional, Sequence

from ankh3_jax import output_paths
from ankh3_jax import plots
from ankh3_jax.ablation import EVAL_TASK_TITLES
from ankh3_jax.ablation import METRIC_NAMES
from ankh3_jax.ablation import SINGLE_OBJECTIVE
from ankh3_jax.ablation import TASKS
from ankh3_jax.ablation import WINDOW_RADIUS
from ankh3_jax.ablation import files
from ankh3_jax.ablation import runs
from ankh3_jax.ablation import stats

TITLE = "# Pre-training ablation: multi-task vs single-objective, small scale"

LOSSES_SVG, PROBES_SVG = "ablation_losses.svg", "ablation_probes.svg"
WIDTH = 90  # markdown paragraphs are wrapped at this many characters


def format_cell(cell: Optional[dict], digits: int = 4) -> str:
  """'0.5012 ± 0.0031' (or the mean alone for one seed) from `stats.mean_std`; '-' when
  missing."""
  if not cell:
    return "-"
  if cell["std"] is None:
    return f"{cell['mean']:.{digits}f}"
  return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]],
           align: Optional[Sequence[str]] = None) -> str:
  align = align or ["---"] * len(header)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def results_table(results: dict) -> str:
  """Markdown table: a row per feature set, a column per probe task (mean ± std)."""
  tasks = [t for t in TASKS if any(t in s for s in results["summary"].values())]
  header = ["encoder (frozen)", *[METRIC_NAMES[t] for t in tasks]]
  rows = []
  for feature in results["feature_sets"]:
    cells = results["summary"].get(feature["name"], {})
    rows.append([feature["label"], *[format_cell(cells.get(t)) for t in tasks]])
  baselines = results.get("baselines", {})
  rows.append(["trivial baseline", *[
      f"{baselines[t]['value']:.4f} ({baselines[t]['name']})" if t in baselines else "-"
      for t in tasks]])
  return _table(header, rows, ["---"] + ["---:"] * len(tasks))


def _objective(rates: dict) -> str:
  """'MLM 15 % (17%) + ... + completion (50%)'; a single task without its share."""
  names = [EVAL_TASK_TITLES.get(task, task) for task in rates]
  if len(names) == 1:
    return names[0]
  return " + ".join(f"{n} ({r:.0%})" for n, r in zip(names, rates.values()))


def setup_table(results: dict) -> str:
  """Experiments: objective mixture, measured tokens seen, training time."""
  header = ["run", "gin file", "objective (mixture share)", "seed", "steps x batch",
            "sequences", "input tokens", "target tokens", "train time"]
  rows = []
  for name in _experiments(results):
    exp = results["experiments"][name]
    s, tokens = exp["settings"], exp["run"]["tokens"] or {}
    count = lambda k: f"{tokens[k]:,}" if k in tokens else "not measured"
    gin_file = " + ".join(f"`gin_configs/{f}`" for f in [s["gin_file"],
                                                          *s.get("extra_gin_files", [])])
    rows.append([f"`{name}`", gin_file, _objective(s["task_rates"]), s["seed"],
                 f"{s['train_steps']} x {s['batch_size']}", count("sequences"),
                 count("input_tokens"), count("target_tokens"),
                 _train_time(exp["run"])])
  return _table(header, rows)


def _train_time(run: dict) -> str:
  """Training minutes; for a resumed run only its last invocation was timed."""
  text = f"{run['train_seconds'] / 60:.1f} min"
  if run.get("resumed_from_step"):
    text += f" (last invocation only: resumed at step {run['resumed_from_step']:,})"
  return text


def _eval_tasks(results: dict, metric: str) -> list:
  names = _experiments(results)
  return [t for t in EVAL_TASK_TITLES
          if any(f"{t}/{metric}" in results["experiments"][n]["run"]["final_eval"]
                 for n in names)]


def residue_table(results: dict) -> str:
  """The primary result: residue cross-entropy of every run on every objective at the
  last step, with the baselines on the same positions (see training/residue_eval.py)."""
  names = _experiments(results)
  tasks = _eval_tasks(results, "residue_loss")
  if not tasks:
    return "(no residue metrics in these results: they predate residue-level evaluation)"
  cell = lambda f, t: (f"{f[f'{t}/residue_loss']:.3f} ({f[f'{t}/gap_unigram']:+.3f} "
                       f"[{f[f'{t}/gap_unigram_ci_low']:+.3f}, "
                       f"{f[f'{t}/gap_unigram_ci_high']:+.3f}])")
  header = ["experiment", *[f"{EVAL_TASK_TITLES[t]}: CE (gap vs unigram [95% CI])"
                            for t in tasks]]
  rows = []
  for name in names:
    final = results["experiments"][name]["run"]["final_eval"]
    rows.append([f"`{name}`", *[cell(final, t) if f"{t}/residue_loss" in final else "-"
                                for t in tasks]])
  final = next(results["experiments"][n]["run"]["final_eval"] for n in names)
  for base in ("unigram", "composition"):
    rows.append([f"*{base} baseline*", *[
        f"{final[f'{t}/{base}_loss']:.3f}" if f"{t}/{base}_loss" in final else "-"
        for t in tasks]])
  return _table(header, rows)


def validation_table(results: dict) -> str:
  """All-token validation loss / accuracy of every run on every objective at the last
  step (sentinels and EOS included: secondary to `residue_table`)."""
  names = _experiments(results)
  tasks = _eval_tasks(results, "loss")
  header = ["experiment", *[f"{EVAL_TASK_TITLES[t]} loss / acc" for t in tasks]]
  rows = []
  for name in names:
    final = results["experiments"][name]["run"]["final_eval"]
    rows.append([f"`{name}`", *[
        f"{final[f'{t}/loss']:.3f} / {final[f'{t}/accuracy']:.3f}"
        if f"{t}/loss" in final else "-" for t in tasks]])
  return _table(header, rows)


def _experiments(results: dict) -> list:
  """The run labels, in report order."""
  return runs.ordered(results["experiments"])


def _objectives(results: dict) -> list:
  """The experiments (objectives) with at least one run, in report order."""
  return list(runs.by_experiment(results["experiments"]))


def residue_comparisons(results: dict) -> list:
  """Per eval task: the objectives ranked by residue cross-entropy (mean over their
  pre-training seeds) and `ankh3` against the best single objective pre-trained on the
  task's format, weighed against the pre-training noise when runs repeat a seed."""
  lines, verdicts = [], stats.residue_verdicts(results)
  for task, title in EVAL_TASK_TITLES.items():
    means = stats.residue_means(results, task)
    if not means:
      continue
    unseen = stats.unseen_format(results, task)
    ranked = sorted(means, key=lambda n: (n in unseen, means[n][0]))
    text = (f"**{title}**: lowest cross-entropy first: " + ", ".join(
        f"`{n}` {means[n][0]:.3f}" + (f" ({means[n][1]} seeds)" if means[n][1] > 1 else "")
        + (" (format never seen)" if n in unseen else "") for n in ranked) + ".")
    verdict = verdicts.get(task)
    if "ankh3" in means and verdict is None:
      text += (" No single objective here was pre-trained on this task's format (below): "
               "nothing to compare `ankh3` with.")
    elif verdict:
      text += (f" `ankh3` - best single objective (`{verdict['best']}`): "
               f"{verdict['diff']:+.3f} nats")
      noise, threshold = verdict["noise"], verdict["threshold"]
      if threshold is not None:
        where = "beyond" if abs(verdict["diff"]) > threshold else "within"
        text += (f", {where} the smallest detectable difference {threshold:.3f} for "
                 f"{verdict['seeds'][0]} against {verdict['seeds'][1]} seed(s) "
                 f"(pre-training seeds: pooled std {noise['std']:.4f}, {noise['df']} "
                 "degrees of freedom).")
      else:
        text += " (one pre-training seed per objective: no noise to weigh it against)."
      if verdict["best_step_diff"] is not None:
        text += (f" Between the lowest points of their held-out curves: "
                 f"{verdict['best_step_diff']:+.3f}.")
    lines.append(text)
  return lines


def residue_conclusion(results: dict) -> str:
  """What the primary result says: per eval task, `ankh3` against the best single
  objective pre-trained on its format, at the end and at the curves' lowest points."""
  verdicts = stats.residue_verdicts(results)
  if not verdicts:
    return ""
  within, beyond = [], []
  for task, v in verdicts.items():
    title = EVAL_TASK_TITLES[task]
    if v["threshold"] is None or abs(v["diff"]) <= v["threshold"]:
      within.append(title)
      continue
    text = (f"{title}, {'ahead' if v['diff'] < 0 else 'behind'} by {abs(v['diff']):.3f} "
            f"nats (`{v['best']}`; detectable {v['threshold']:.3f})")
    if v["best_step_diff"] is not None and abs(v["best_step_diff"]) <= v["threshold"]:
      text += (f", but between the lowest points of the held-out curves only "
               f"{v['best_step_diff']:+.3f}, within it: the difference at the end is "
               "over-fitting (held-out curves above), not what the objectives learned")
    beyond.append(text)
  parts = []
  if within:
    parts.append("within the smallest detectable difference of the best single objective "
                 "pre-trained on the task's format on " + ", ".join(within))
  if beyond:
    parts.append("beyond it on " + "; ".join(beyond))
  return ("Primary result (residue cross-entropy on held-out clusters, end of "
          "pre-training): `ankh3` is " + "; and ".join(parts) + ".")


def unseen_format_lines(results: dict) -> list:
  """One line naming the cells `unseen_format` leaves out, and why."""
  cells = []
  for task, title in EVAL_TASK_TITLES.items():
    means, unigram = stats.residue_means(results, task), stats.unigram(results, task)
    for name in sorted(stats.unseen_format(results, task) & set(means)):
      versus = (f", {means[name][0] - unigram:+.2f} against unigram" if unigram is not None
                else "")
      cells.append(f"`{name}` on {title} ({means[name][0]:.3f} nats{versus})")
  if not cells:
    return []
  return ["Left out of the comparisons and the noise estimate above, because the run's "
          "pre-training never showed that task's format (MLM at a lower rate never uses "
          "the higher sentinel ids `<extra_id_N>` that denser masking needs; MLM alone "
          "never continues a sequence; completion alone never sees a sentinel), so the "
          "score measures coverage of the format, not context: " + "; ".join(cells) + "."]


def held_out_rises(results: dict) -> list:
  """Runs whose held-out residue cross-entropy on a task their pre-training shows ended
  above its lowest point on the curve by more than the final value's 95% half-interval:
  over-fitting the training sequences (the comparisons are at the end, not the best)."""
  lines = []
  for label in runs.ordered(results["experiments"]):
    experiment = results["experiments"][label]
    curves, rates = experiment["run"].get("eval_curves", {}), experiment["settings"].get(
        "task_rates") or {}
    for task, title in EVAL_TASK_TITLES.items():
      curve = curves.get(f"{task}/residue_loss")
      low, high = (curves.get(f"{task}/residue_loss_ci_{side}") for side in ("low", "high"))
      if not curve or not low or not high or not any(stats.shows_format(t, task) for t in rates):
        continue
      best_step, best = min(curve, key=lambda point: point[1])
      final_step, final = curve[-1]
      if final - best > (high[-1][1] - low[-1][1]) / 2:
        lines.append(f"`{label}` on {title}: lowest {best:.3f} at step {best_step:,}, "
                     f"{final:.3f} at step {final_step:,} ({final - best:+.3f})")
  if not lines:
    return []
  return ["Held-out cross-entropy that rose again on a task the run trains on (by more "
          "than the final value's 95% half-interval): the run over-fits its training "
          "sequences, and the comparisons above, made at the end of pre-training, are not "
          "at each run's best step: " + "; ".join(lines) + "."]


def _verdict(diff: float, spread: float) -> str:
  if spread == 0.0:
    return f"{diff:+.4f} (no seed spread to compare with)"
  where = "outside" if stats.beyond_spread(diff, spread) else "within"
  return (f"{diff:+.4f}, {abs(diff) / spread:.2f}x the combined seed spread {spread:.4f} "
          f"({where} 2x)")


def _listed(names: Sequence[str]) -> str:
  return ", ".join(names) if names else "none"


def conclusion(results: dict) -> str:
  """One data-driven sentence on what the run says about the claim."""
  names = _objectives(results)
  if "random_init" in stats.pooled(results) and not any(
      stats.outcomes(results, n, "random_init")["ahead"] for n in names):
    return ("No pre-trained encoder beats its random initialisation by more than twice "
            "the seed spread on any probe task: at this scale the probes do not see what "
            "pre-training adds, so the ranking of the objectives below says nothing for "
            "or against the paper's claim.")
  singles = [n for n in SINGLE_OBJECTIVE if n in names]
  if "ankh3" not in names or not singles:
    return "The run lacks `ankh3` or every single-objective run: no comparison to draw."
  outcomes = [stats.outcomes(results, "ankh3", n) for n in singles]
  ahead_of_all = [t for t in outcomes[0]["ahead"] if all(t in o["ahead"] for o in outcomes)]
  behind_any = sorted({t for o in outcomes for t in o["behind"]})
  if ahead_of_all and not behind_any:
    return (f"`ankh3` beats every single-objective run on {_listed(ahead_of_all)} and is "
            "behind none: consistent with the paper's claim, at this scale and with the "
            "caveats below.")
  if behind_any:
    return (f"`ankh3` is behind at least one single-objective run on "
            f"{_listed(behind_any)}: at this scale the results do not support the claim.")
  return ("`ankh3` is not separated from the single-objective runs by more than twice the "
          "seed spread on any task: the run does not distinguish the objectives.")


def headline(results: dict) -> list:
  """Summary sentences: `ankh3` vs each single objective, pre-training vs none."""
  names = _objectives(results)
  lines = []
  if "ankh3" in names:
    for single in (n for n in SINGLE_OBJECTIVE if n in names):
      o = stats.outcomes(results, "ankh3", single)
      lines.append(f"`ankh3` vs `{single}`: ahead by more than 2x the seed spread on "
                   f"{_listed(o['ahead'])}; behind by that much on {_listed(o['behind'])}; "
                   f"within it on {_listed(o['within'])}.")
  for reference, what in (("random_init", "its random initialisation"),
                          ("onehot_window", f"the one-hot window ±{WINDOW_RADIUS}")):
    if reference not in stats.pooled(results):
      continue
    for name in names:
      o = stats.outcomes(results, name, reference)
      lines.append(f"`{name}` vs {what}: ahead on "
                   f"{_listed(o['ahead'])}; behind on {_listed(o['behind'])}; within on "
                   f"{_listed(o['within'])}.")
  return lines


def comparisons(results: dict) -> list:
  """Data-driven sentences comparing the runs, per probe task."""
  lines = []
  names = _objectives(results)
  summary = stats.pooled(results)
  singles = [n for n in SINGLE_OBJECTIVE if n in names]
  for task in TASKS:
    metric = METRIC_NAMES[task]
    ranked = sorted((n for n in names if task in summary.get(n, {})),
                    key=lambda n: -summary[n][task]["mean"])
    if not ranked:
      continue
    parts = [f"**{metric}**: ranking " + " > ".join(f"`{n}`" for n in ranked) + "."]
    if "ankh3" in ranked and singles:
      best = max((n for n in singles if n in ranked),
                 key=lambda n: summary[n][task]["mean"], default=None)
      if best:
        diff = stats.difference(results, task, "ankh3", best)
        parts.append(f"`ankh3` - best single objective (`{best}`): {_verdict(*diff)}.")
    if "mlm_multi" in ranked and "mlm15_only" in ranked:
      diff = stats.difference(results, task, "mlm_multi", "mlm15_only")
      parts.append(f"`mlm_multi` - `mlm15_only`: {_verdict(*diff)}.")
    if "random_init" in summary and ranked:
      diff = stats.difference(results, task, ranked[0], "random_init")
      parts.append(f"Best run (`{ranked[0]}`) - random init: {_verdict(*diff)}.")
    lines.append(" ".join(parts))
  return lines


def losses_svg(results: dict) -> str:
  """Train loss, then per objective the validation residue cross-entropy with the
  unigram and composition baselines as flat lines (all-token loss for older results)."""
  names = _experiments(results)
  panels = [("train loss (own objective, all tokens)",
             {n: results["experiments"][n]["run"]["train_curve"] for n in names})]
  legend = list(names)
  for task, title in EVAL_TASK_TITLES.items():
    curves_of = lambda key: {n: results["experiments"][n]["run"]["eval_curves"].get(
        f"{task}/{key}", []) for n in names}
    curves = curves_of("residue_loss")
    if any(curves.values()):
      for base in ("unigram", "composition"):
        line = next((c for c in curves_of(f"{base}_loss").values() if c), [])
        if line:
          curves[f"{base} baseline"] = line
          legend += [] if f"{base} baseline" in legend else [f"{base} baseline"]
      panels.append((f"validation residue CE: {title}", curves))
    elif any(curves_of("loss").values()):
      panels.append((f"validation loss: {title}", curves_of("loss")))
  return plots.svg_text(plots.line_panels("Pre-training: cross-entropy (nats)", panels,
                                          legend, x_label="step", columns=3))


def probes_svg(results: dict) -> str:
  labels = {f["name"]: f["short"] for f in results["feature_sets"]}
  order = [n for n in _experiments(results)] + [
      f["name"] for f in results["feature_sets"] if f["name"] not in results["experiments"]]
  panels = []
  for task in TASKS:
    groups = {labels[n]: (s[task]["mean"], s[task]["std"], s[task]["values"])
              for n in order for s in [results["summary"].get(n, {})] if task in s}
    if not groups:
      continue
    base = results.get("baselines", {}).get(task)
    reference = (base["name"], base["value"]) if base and base["value"] else None
    panels.append((f"{METRIC_NAMES[task]} (test)", groups, reference))
  return plots.svg_text(plots.point_panels(
      "Linear probes of the frozen encoders: mean ± std over probe seeds", panels,
      [labels[n] for n in order], columns=len(panels) or 1))


def _para(text: str) -> str:
  return textwrap.fill(text, WIDTH, break_long_words=False, break_on_hyphens=False)


def _bullet(text: str) -> str:
  return textwrap.fill(text, WIDTH, initial_indent="- ", subsequent_indent="  ",
                       break_long_words=False, break_on_hyphens=False)


def _setup_bullets(results: dict) -> list:
  s, p, data = results["shared"], results["probe_settings"], results["probe_data"]
  lengths = s["feature_lengths"]
  seeds = ", ".join(str(x) for x in p["seeds"])
  return [
      f"**Model**: preset `{s['model_preset']}` (d_model {s['d_model']}, "
      f"{s['encoder_layers']}+{s['decoder_layers']} layers, {s['parameters']:,} "
      f"parameters of which {s['encoder_parameters']:,} in the probed encoder with its "
      "embedding), the same initialisation in every run.",
      f"**Budget**: {s['train_steps']} steps x batch {s['batch_size']} packed rows of "
      f"{lengths['inputs']} input + {lengths['targets']} target positions = "
      f"{s['padded_positions']:,} token positions per run, identical by construction "
      "(first-fit packing; a sequence longer than a row is cropped to a random window). "
      "How the positions fill with real tokens depends on the objective: MLM targets "
      "are short (sentinels and masked residues), so MLM rows are bound by their input; "
      "completion splits a crop in halves, so its rows are bound by their target. The "
      "table gives the measured non-padding tokens (`tokens_seen.json` of each run, "
      "counted on the batches the trainer consumed; targets are the scored tokens).",
      f"**Seeds**: {_pretraining_seeds(results)}; probe seeds {seeds}.",
      "**Pre-training data**: the shipped corpus, 8,000 UniProtKB training sequences "
      "(`ankh3_jax/assets/corpus`, from Debian's `mmseqs2-examples`, UniProt data under "
      "CC BY 4.0; see its SOURCE.md). Validation on its 500-sequence validation split: "
      "every run on every objective, with the same masks.",
      "**Probe data**: the shipped structure set (`ankh3_jax/assets/downstream`, PDB "
      "chains from ProMod3's structure database, no near-identical chains within or "
      f"across splits; see its SOURCE.md): {data['train_chains']:,} train chains, scored "
      f"on {data['test_chains']:,} test chains ({data['test_residues']:,} residues).",
      "**Probes**: linear heads (`ankh3_jax.downstream.heads`) on the frozen per-residue "
      "encoder outputs (`[NLU]` prefix): SS3 and SS8 per-residue classifiers (Q3, Q8); a "
      "bilinear contact scorer with a sequence-separation bias (long-range P@L/5: top "
      "L/5 pairs with |i-j| >= 24, contact = CB-CB < 8 Å); a per-residue regression of "
      "burial, the number of CB atoms within 10 Å of the residue's CB (Spearman's rho "
      "over all test residues). Relative solvent accessibility is not derivable: the "
      "shipped chains keep only CB coordinates. Each probe: "
      f"{p['steps']} AdamW steps of batch {p['batch_size']}, learning rate "
      f"{p['learning_rate']:g} (picked on the validation split between 3e-3 and 1e-2), "
      f"contact probes trained on random {p['contact_crop']}-residue windows.",
      "**References**: the same probes on one-hot residues (no encoder), on a one-hot "
      f"window of ±{WINDOW_RADIUS} residues (no encoder, but the local sequence a linear "
      "probe needs for secondary structure: the fair context-free baseline) and on the "
      "encoder at its initialisation (step 0 of every run, no pre-training).",
  ]


def _repeated(results: dict) -> list:
  """The objectives pre-trained with more than one seed."""
  return [n for n, labels in runs.by_experiment(results["experiments"]).items()
          if len(labels) > 1]


def _pretraining_seeds(results: dict) -> str:
  s = results["shared"]
  if "seeds" not in s:  # older results: one shared seed
    return f"pre-training seed {s['seed']} in every run (initialisation, data order, masks)"
  seeds = sorted(set(s["seeds"].values()))
  if len(seeds) == 1:
    return f"pre-training seed {seeds[0]} in every run (initialisation, data order, masks)"
  return ("pre-training seeds (initialisation, data order, masks) per run: " +
          ", ".join(f"`{n}` {s['seeds'][n]}" for n in _experiments(results)))


def _noise_caveat(results: dict) -> str:
  repeated = _repeated(results)
  if not repeated:
    return ("Pre-training noise: every run uses one pre-training seed, so the spreads "
            "measure only probe training (initialisation and batch order). Two "
            "pre-trainings of one objective with different seeds can differ by more than "
            "these spreads, so even a difference of several spreads is weak evidence, and "
            "one within them is none. A second pre-training seed is a run `NAME@SEED` in "
            "`--experiments` (e.g. `ankh3@1`).")
  single = [n for n in _objectives(results) if n not in repeated]
  text = (f"Pre-training noise: {_listed([f'`{n}`' for n in repeated])} were pre-trained "
          "with two or more seeds, and their spreads hold both pre-training and probe "
          "seeds. A few seeds estimate the pre-training noise coarsely (few degrees of "
          "freedom: a large t quantile in the smallest detectable differences above).")
  if single:
    text += (f" {_listed([f'`{n}`' for n in single])} had one pre-training seed: "
             "their spreads are probe seeds only, and they are compared with the others "
             "against that smaller spread, which flatters any difference.")
  return text


def noise_lines(results: dict) -> list:
  """The pre-training noise of the residue cross-entropy, per eval task."""
  lines = []
  for task, title in EVAL_TASK_TITLES.items():
    noise = stats.seed_noise(results, task)
    if noise:
      spreads = ", ".join(f"`{n}` {v:.4f}" for n, v in noise["spreads"].items())
      lines.append(f"**{title}**: seed-to-seed range {spreads}; pooled std "
                   f"{noise['std']:.4f} ({noise['df']} df); smallest detectable difference "
                   f"between two objectives with {noise['seeds_per_objective']} seeds each: "
                   f"{noise['detectable']:.3f} nats; between one with "
                   f"{noise['seeds_per_objective']} and one with 1: "
                   f"{stats.detectable(noise, noise['seeds_per_objective'], 1):.3f}.")
  return lines


def _caveats(results: dict) -> list:
  s, data = results["shared"], results["probe_data"]
  return [
      f"Anything at the paper's scale: {s['parameters']:,} parameters and "
      f"{s['padded_positions']:,} token positions per run, against Ankh3's "
      "billion-parameter models trained on UniRef50 for far longer. Objectives can rank "
      "differently once models are large and trained to convergence.",
      _noise_caveat(results),
      "Fine-tuning or non-linear heads: the probes are linear on frozen features; the "
      "references show how much of each score needs no pre-training.",
      f"Generality: one small probe set ({data['test_chains']:,} test chains from one "
      "structure database) and one small pre-training corpus (8,000 UniProt sequences, "
      "not UniRef50).",
  ]


def _count_words(results: dict) -> str:
  """'6 pre-trainings of 4 objectives', from the results."""
  runs_n, objectives = len(results["experiments"]), len(_objectives(results))
  return (f"{runs_n} pre-training{'s' if runs_n != 1 else ''} of {objectives} "
          f"objective{'s' if objectives != 1 else ''}")


def render(results: dict, losses_path: str, probes_path: str) -> str:
  """The markdown page; plot paths are relative to the page."""
  invocations = results.get("invocations") or [
      {"seconds": results["wall_seconds"], "work": results.get("work", {})}]
  working = [i for i in invocations if any(i.get("work", {}).values())] or invocations[-1:]
  total = sum(i["seconds"] for i in working)
  loads = ", ".join(f"{i['load_average']:.1f}" for i in working if "load_average" in i)
  load_note = f" (load average at the start: {loads})" if loads else ""
  if len(working) == 1:
    wall = f"Wall time of the run that made these results: {total / 60:.1f} min"
  else:
    each = ", ".join(f"{i['seconds'] / 60:.1f}" for i in working)
    wall = (f"Wall time of the {len(working)} invocations that made these results: "
            f"{total / 60:.1f} min in all ({each} min)")
  wall += f" on {results['machine']}{load_note}."
  resumed = [n for n, e in results["experiments"].items() if e["run"].get("resumed_from_step")]
  if resumed:
    wall += (f" {_listed([f'`{n}`' for n in resumed])} also trained in earlier, "
             "interrupted invocations, which recorded no time.")
  if len(invocations) > len(working):
    wall += (f" {len(invocations) - len(working)} later invocation(s) only re-rendered "
             "this page from the stored results.")
  pretraining = sum(e["run"]["train_seconds"] for e in results["experiments"].values())
  probing = sum(r.get("seconds", 0.0) for tasks in results["probes"].values()
                for seeds in tasks.values() for r in seeds.values())
  lines = [
      TITLE,
      "",
      _para("The Ankh3 paper's central claim is that pre-training on MLM at several "
            "masking probabilities plus sequence completion gives better representations "
            "than single-objective pre-training. This page tests it at a size a CPU can "
            f"run: {_count_words(results)} that differ only in the objective (and "
            "the pre-training seed, where one objective runs more than once), each "
            "encoder frozen and probed on the shipped structure data. The command below writes "
            "the whole page (numbers, tables, plots); rerun it rather than editing."),
      "",
      "## Reproduce",
      "",
      "<!-- docs-test: skip (pre-trains and probes every run: minutes to hours) -->",
      "```bash",
      results["command"],
      "```",
      "",
      _para(f"{wall} "
            f"Recorded stage times: pre-training {pretraining / 60:.1f} min in all, probe "
            f"training and scoring {probing / 60:.1f} min (feature extraction, start-up "
            "and the rest make up the difference). "
            "Outputs (checkpoints, logs, one JSON per probe) go to `--out_dir`; rerunning "
            "skips finished pre-trainings and probes, and an unfinished pre-training "
            "resumes from its checkpoint. `--experiments`, `--seeds`, `--train_steps` and "
            "`--gin.NAME=VALUE` change the experiment. All numbers are also in the JSON "
            "file next to this page."),
      "",
      "## Setup",
      "",
      *[_bullet(b) for b in _setup_bullets(results)],
      "",
      setup_table(results),
      "",
      "## Results",
      "",
      "Test-split scores, mean ± sample standard deviation over probe seeds:",
      "",
      results_table(results),
      "",
      f"![probe scores]({probes_path})",
      "",
      "Validation at the end of pre-training, primary result: cross-entropy over residue "
      "targets only (masked residues, continuation residues; nats), with the gap to the "
      "unigram baseline on the same positions (> 0: better than residue frequencies) and "
      "its 95% bootstrap interval over validation sequences:",
      "",
      residue_table(results),
      "",
      *([_para("Objectives compared on residue cross-entropy (mean over their pre-training "
               "seeds), the primary result; the smallest detectable difference is "
               "t(0.975, df) x pooled seed std x sqrt(1 / seeds_a + 1 / seeds_b), from "
               "the objectives pre-trained more than once:"), "",
         *[_bullet(c) for c in [*residue_comparisons(results), *noise_lines(results),
                                  *unseen_format_lines(results),
                                  *held_out_rises(results)]],
         ""] if stats.residue_means(results, "ankh3_mlm_p15") else []),
      "All target tokens (sentinels and EOS included; cross-entropy per target token):",
      "",
      validation_table(results),
      "",
      f"![loss curves]({losses_path})",
      "",
      "## What it shows",
      "",
      *([_para(residue_conclusion(results)), ""] if residue_conclusion(results) else []),
      _para("Probes (second): differences between objectives per probe task are weighed "
            "against the spread: the standard deviations of the two objectives combined "
            "(root of the sum of squares), each over its probe seeds"
            + (" and, where it has several, its pre-training seeds" if _repeated(results)
               else "") + ". " + conclusion(results)),
      "",
      *[_bullet(c) for c in headline(results)],
      "",
      "Per task:",
      "",
      *[_bullet(c) for c in comparisons(results)],
      "",
      "What it does **not** show:",
      "",
      *[_bullet(c) for c in _caveats(results)],
      "",
  ]
  return "\n".join(lines)


def page_paths(doc_path: str) -> list:
  """The page, its JSON copy of the results and its two SVGs."""
  directory = os.path.dirname(os.path.abspath(doc_path))
  return [doc_path, os.path.splitext(doc_path)[0] + ".json",
          os.path.join(directory, LOSSES_SVG), os.path.join(directory, PROBES_SVG)]


def is_our_page(doc_path: str) -> bool:
  """Whether `doc_path` is a page `render` wrote (its first line is our title)."""
  try:
    with open(doc_path, encoding="utf-8") as f:
      return f.readline().rstrip("\n") == TITLE
  except (OSError, UnicodeDecodeError):
    return False


def check_page_paths(doc_path: str, overwrite: bool = False) -> None:
  """Raises `output_paths.OutputError` if writing the page would replace a file this
  command did not write (a page without our title, or siblings without our page), unless
  `overwrite`; a page is never written over the working directory."""
  for path in page_paths(doc_path):
    output_paths.check_not_input(path, what="--doc")
    if os.path.isdir(path):
      raise output_paths.OutputError(f"--doc {doc_path}: {path} is a directory")
  existing = [p for p in page_paths(doc_path) if os.path.lexists(p)]
  if overwrite or not existing or is_our_page(doc_path):
    return
  raise output_paths.OutputError(
      f"--doc {doc_path}: {existing[0]} exists and was not written by ankh3-ablation; "
      "choose another --doc, or pass --overwrite to replace it")


def write_page(results: dict, doc_path: str) -> list:
  """Writes the markdown page and its two SVGs next to it (atomically); returns paths."""
  directory = os.path.dirname(os.path.abspath(doc_path))
  losses_path = os.path.join(directory, LOSSES_SVG)
  probes_path = os.path.join(directory, PROBES_SVG)
  files.write_text(losses_path, losses_svg(results))
  files.write_text(probes_path, probes_svg(results))
  files.write_text(doc_path, render(results, LOSSES_SVG, PROBES_SVG))
  return [doc_path, losses_path, probes_path]
