"""Tables and curves of pre-training runs, for docs/pretraining.md.

A run is an `ankh3-train` MODEL_DIR (`eval_metrics.jsonl`, `train_metrics.jsonl`) or an
output directory of `scripts/pretrain_accelerator.py` (`curve.jsonl`).

  python scripts/pretraining_report.py RUN_DIR [RUN_DIR ...] --figure_dir docs/figures \
      --name reference

Prints one markdown table per task (residue cross-entropy of the last evaluation, its 95%
interval, the gaps to the unigram and composition baselines with intervals, tokens, time)
and writes the figure `<name>.svg` (or .png): per task, residue cross-entropy against
tokens seen, one line per run, the baselines as horizontal lines.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.ticker  # pylint: disable=g-import-not-at-top,wrong-import-position

from ankh3_jax import plots  # pylint: disable=g-import-not-at-top,wrong-import-position

TASKS = ("mlm_p15", "mlm_p20", "mlm_p30", "completion")


def _jsonl(path: str) -> list:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def trainer_curve(model_dir: str) -> list:
  """curve.jsonl-style rows from an ankh3-train MODEL_DIR: tokens and seconds summed
  from train_metrics.jsonl (means over each `log_every` interval)."""
  seen = {0: (0.0, 0.0)}
  tokens = seconds = 0.0
  previous = 0
  for row in _jsonl(os.path.join(model_dir, "train_metrics.jsonl")):
    steps = row["step"] - previous
    added = (row["input_tokens"] + row["target_tokens"]) * steps
    tokens += added
    seconds += added / max(row["tokens_per_second"], 1e-9)
    seen[row["step"]] = (tokens, seconds)
    previous = row["step"]
  curve = []
  for row in _jsonl(os.path.join(model_dir, "eval_metrics.jsonl")):
    tasks = {}
    for key, value in row.items():
      if "/" in key:
        task, metric = key.split("/", 1)
        tasks.setdefault(task.split("_", 1)[1], {})[metric] = value
    done = max(s for s in seen if s <= row["step"])
    curve.append({"step": row["step"], "tokens": seen[done][0],
                  "train_seconds": seen[done][1], "eval": tasks})
  return curve


def load_run(run_dir: str) -> dict:
  if os.path.exists(os.path.join(run_dir, "curve.jsonl")):
    curve = _jsonl(os.path.join(run_dir, "curve.jsonl"))
  else:
    curve = trainer_curve(run_dir)
  if not curve:
    raise ValueError(f"{run_dir}: no evaluation yet")
  return {"name": os.path.basename(os.path.normpath(run_dir)), "curve": curve}


def _ci(metrics: dict, key: str) -> str:
  return (f"{metrics[key]:+.3f} [{metrics[key + '_ci_low']:+.3f}, "
          f"{metrics[key + '_ci_high']:+.3f}]")


def task_table(runs: list, task: str) -> str:
  rows = ["| run | tokens | train time | residue CE [95% CI] | unigram | composition | "
          "gap vs unigram | gap vs composition |", "|---|---|---|---|---|---|---|---|"]
  for run in runs:
    last = run["curve"][-1]
    m = last["eval"][task]
    rows.append(
        f"| {run['name']} | {last['tokens'] / 1e6:.1f}M | {last['train_seconds']:.0f} s | "
        f"{m['residue_loss']:.3f} [{m['residue_loss_ci_low']:.3f}, "
        f"{m['residue_loss_ci_high']:.3f}] | {m['unigram_loss']:.3f} | "
        f"{m['composition_loss']:.3f} | {_ci(m, 'gap_unigram')} | "
        f"{_ci(m, 'gap_composition')} |")
  return "\n".join(rows)


def plot_tasks(runs: list, path: str) -> None:
  """One panel per task: residue CE (95% interval as error bars) against tokens seen."""
  fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
  for ax, task in zip(axes.flat, TASKS):
    for run in runs:
      rows = [r for r in run["curve"] if r["tokens"] > 0 and task in r["eval"]]
      if not rows:
        continue
      x = [r["tokens"] / 1e6 for r in rows]
      y = [r["eval"][task]["residue_loss"] for r in rows]
      err = [[v - r["eval"][task]["residue_loss_ci_low"] for v, r in zip(y, rows)],
             [r["eval"][task]["residue_loss_ci_high"] - v for v, r in zip(y, rows)]]
      ax.errorbar(x, y, yerr=err, marker=".", capsize=2, label=run["name"])
    last = runs[0]["curve"][-1]["eval"][task]
    ax.axhline(last["unigram_loss"], color="grey", linestyle="--", label="unigram")
    ax.axhline(last["composition_loss"], color="black", linestyle=":", label="composition")
    highest = max([r["eval"][task]["residue_loss_ci_high"] for run in runs
                   for r in run["curve"] if r["tokens"] > 0 and task in r["eval"]],
                  default=0.0)
    ax.set_ylim(last["composition_loss"] - 0.08,
                max(last["unigram_loss"] + 0.12, min(highest + 0.02, 4.0)))
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(f"{task}: held-out validation residues", fontsize=10)
    ax.set_ylabel("residue cross-entropy (nats)")
  for ax in axes[1]:
    ax.set_xlabel("tokens seen (millions: input + scored target)")
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  if path.endswith(".svg"):  # the same bytes for the same figure, as the other pages'
    with open(path, "w", encoding="utf-8") as f:
      f.write(plots.svg_text(fig))
  else:
    fig.savefig(path)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run_dirs", nargs="+")
  parser.add_argument("--figure_dir")
  parser.add_argument("--name", default="pretraining")
  parser.add_argument("--format", default="svg", choices=["svg", "png"])
  args = parser.parse_args(argv)
  runs = [load_run(d) for d in args.run_dirs]
  for task in TASKS:
    print(f"\n### {task}\n\n{task_table(runs, task)}")
  if args.figure_dir:
    os.makedirs(args.figure_dir, exist_ok=True)
    plot_tasks(runs, os.path.join(args.figure_dir, f"{args.name}.{args.format}"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
