"""The ablation's numbers: means and spreads over seeds, pre-training noise, which eval
formats a run's pre-training showed, and which differences exceed the noise.

`report` turns them into tables and sentences; nothing here formats text.
"""
import math
import re
from typing import Optional, Sequence

from ankh3_jax.ablation import EVAL_TASK_TITLES
from ankh3_jax.ablation import METRIC_NAMES
from ankh3_jax.ablation import SINGLE_OBJECTIVE
from ankh3_jax.ablation import TASKS
from ankh3_jax.ablation import runs


def mean_std(values: Sequence[float]) -> dict:
  """{'mean', 'std' (sample, n - 1; None below two values), 'n', 'values'}."""
  values = [float(v) for v in values]
  if not values:
    raise ValueError("no values")
  mean = sum(values) / len(values)
  std = None
  if len(values) > 1:
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
  return {"mean": mean, "std": std, "n": len(values), "values": values}


def summarize(probes: dict) -> dict:
  """{feature set: {task: mean_std over seeds}} from {feature set: {task: {seed: score}}}."""
  return {name: {task: mean_std([s["metric"] for s in by_seed.values()])
                 for task, by_seed in tasks.items()}
          for name, tasks in probes.items()}


def _is_run(name: str) -> bool:
  try:
    runs.parse(name)
    return True
  except ValueError:
    return False


def pool(probes: dict) -> dict:
  """{objective or reference: {task: mean_std}}: an objective's runs pooled, so its spread
  holds pre-training seeds as well as probe seeds (see `runs`)."""
  groups = {}
  for name, tasks in probes.items():
    key = runs.experiment(name) if _is_run(name) else name
    for task, by_seed in tasks.items():
      groups.setdefault(key, {}).setdefault(task, []).extend(
          s["metric"] for s in by_seed.values())
  return {key: {task: mean_std(values) for task, values in tasks.items()}
          for key, tasks in groups.items()}


def pooled(results: dict) -> dict:
  """The per-objective `pool` of `results`, or its per-run summary where it has none."""
  return results.get("pooled") or results["summary"]  # older results: one run each


def seed_noise(results: dict, task: str) -> Optional[dict]:
  """Pre-training noise of the residue cross-entropy on eval `task`, from the objectives
  with two or more runs (pre-training seeds): {'std' (pooled within objectives), 'df',
  't' (two-sided 5 % quantile), 'detectable' (the smallest difference between two
  objectives' means over `seeds_per_objective` runs each that a two-sided t-test at 5 %
  would call real; `detectable` below for other counts), 'seeds_per_objective', 'spreads'
  ({objective: max - min over its seeds})}; None without repeated seeds."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  key = f"{task}/residue_loss"
  squares, df, spreads, counts = 0.0, 0, {}, []
  unseen = unseen_format(results, task)
  for objective, labels in runs.by_experiment(results["experiments"]).items():
    if objective in unseen:
      continue  # its spread is about the format it never saw, not pre-training noise
    values = [results["experiments"][l]["run"]["final_eval"].get(key) for l in labels]
    values = [v for v in values if v is not None]
    if len(values) < 2:
      continue
    mean = sum(values) / len(values)
    squares += sum((v - mean) ** 2 for v in values)
    df += len(values) - 1
    spreads[objective] = max(values) - min(values)
    counts.append(len(values))
  if not df:
    return None
  std, n, t = math.sqrt(squares / df), min(counts), float(stats.t.ppf(0.975, df))
  noise = {"std": std, "df": df, "t": t, "seeds_per_objective": n, "spreads": spreads}
  return {**noise, "detectable": detectable(noise, n, n)}


def detectable(noise: dict, seeds_a: int, seeds_b: int) -> float:
  """Smallest detectable difference between means over `seeds_a` and `seeds_b` runs."""
  return noise["t"] * noise["std"] * math.sqrt(1 / seeds_a + 1 / seeds_b)


def residue_means(results: dict, task: str) -> dict:
  """{objective: (mean final residue cross-entropy over its runs, runs)} on eval `task`."""
  out = {}
  for objective, labels in runs.by_experiment(results["experiments"]).items():
    values = [results["experiments"][l]["run"]["final_eval"].get(f"{task}/residue_loss")
              for l in labels]
    values = [v for v in values if v is not None]
    if values:
      out[objective] = (sum(values) / len(values), len(values))
  return out


def best_means(results: dict, task: str) -> dict:
  """{objective: mean over its runs of the lowest held-out residue cross-entropy on its
  curve}, for objectives whose runs all have that curve."""
  out = {}
  for objective, labels in runs.by_experiment(results["experiments"]).items():
    curves = [results["experiments"][l]["run"].get("eval_curves", {}).get(
        f"{task}/residue_loss") for l in labels]
    if curves and all(curves):
      out[objective] = sum(min(v for _, v in c) for c in curves) / len(curves)
  return out


def residue_verdicts(results: dict) -> dict:
  """{eval task: {'best': the best single objective pre-trained on the task's format,
  'diff': ankh3's mean - its mean at the end, 'threshold': the smallest detectable
  difference (None without repeated seeds), 'best_step_diff': the same difference
  between the lowest points of their curves (None without curves)}} where both exist."""
  out = {}
  for task in EVAL_TASK_TITLES:
    means, unseen = residue_means(results, task), unseen_format(results, task)
    singles = sorted((n for n in means if n in SINGLE_OBJECTIVE and n not in unseen),
                     key=lambda n: means[n][0])
    if "ankh3" not in means or "ankh3" in unseen or not singles:
      continue
    best, noise, lowest = singles[0], seed_noise(results, task), best_means(results, task)
    out[task] = {
        "best": best, "diff": means["ankh3"][0] - means[best][0],
        "threshold": (detectable(noise, means["ankh3"][1], means[best][1]) if noise
                      else None),
        "noise": noise, "seeds": (means["ankh3"][1], means[best][1]),
        "best_step_diff": (lowest["ankh3"] - lowest[best]
                           if "ankh3" in lowest and best in lowest else None)}
  return out


def unigram(results: dict, task: str) -> Optional[float]:
  """The unigram baseline's residue cross-entropy on eval `task` (None if not measured)."""
  finals = [e["run"]["final_eval"] for e in results["experiments"].values()]
  return next((f[f"{task}/unigram_loss"] for f in finals if f"{task}/unigram_loss" in f),
              None)


_MLM_RATE = re.compile(r"_mlm_p(\d+(?:_\d+)?)$")


def task_format(task: str) -> tuple:
  """(kind, density) of a pre-training or eval task: ('mlm', masking rate) for
  `<prefix>_mlm_pNN`, ('mlm', inf) for other MLM tasks (a rate drawn per example),
  ('completion', 0) for completion, (task, 0) for anything else."""
  match = _MLM_RATE.search(task)
  if match:
    return "mlm", float(match.group(1).replace("_", ".")) / 100
  if "_mlm" in task:
    return "mlm", math.inf
  if task.endswith("completion"):
    return "completion", 0.0
  return task, 0.0


def shows_format(trained: str, task: str) -> bool:
  """Whether pre-training on task `trained` shows eval `task`'s inputs: the same kind, and
  for MLM a rate at least as dense (one sentinel id per masked span, numbered from the
  first, so denser masking reaches ids `<extra_id_N>` a sparser rate never uses)."""
  kind, density = task_format(trained)
  want_kind, want_density = task_format(task)
  return kind == want_kind and density >= want_density


def unseen_format(results: dict, task: str) -> set:
  """Objectives none of whose pre-training tasks `shows_format` of eval `task`: their
  score there measures the format, not context, and is left out of the comparisons and
  the noise estimate. Objectives whose mixture was not recorded are kept."""
  unseen = set()
  for objective, labels in runs.by_experiment(results["experiments"]).items():
    rates = results["experiments"][labels[0]]["settings"].get("task_rates")
    if rates and not any(shows_format(trained, task) for trained in rates):
      unseen.add(objective)
  return unseen


def difference(results: dict, task: str, a: str, b: str) -> Optional[tuple]:
  """(mean a - mean b, combined std) of a probe task, or None if either is missing."""
  summary = pooled(results)
  if task not in summary.get(a, {}) or task not in summary.get(b, {}):
    return None
  sa, sb = summary[a][task], summary[b][task]
  spread = math.sqrt((sa["std"] or 0.0) ** 2 + (sb["std"] or 0.0) ** 2)
  return sa["mean"] - sb["mean"], spread


def beyond_spread(diff: float, spread: float) -> bool:
  """Whether a difference exceeds twice the combined seed spread (the page's threshold)."""
  return abs(diff) > 2 * spread


def outcomes(results: dict, a: str, b: str) -> dict:
  """{'ahead': [...], 'behind': [...], 'within': [...]}: probe tasks where run `a` is
  more than twice the combined seed spread above / below run `b`, or neither."""
  out = {"ahead": [], "behind": [], "within": []}
  for task in TASKS:
    diff = difference(results, task, a, b)
    if diff is None:
      continue
    delta, spread = diff
    key = "ahead" if delta > 0 else "behind"
    out[key if beyond_spread(delta, spread) else "within"].append(METRIC_NAMES[task])
  return out
