"""Train/eval summaries: TensorBoard (clu metric writers), JSON lines, the final table.

Written by process 0 only, under MODEL_DIR:
  train/, eval/            TensorBoard event files (runs 'train' and 'eval');
  train_metrics.jsonl      one line per logged step: {"step": ..., "loss": ..., ...};
  eval_metrics.jsonl       one line per evaluation: {"step": ..., "<task>/loss": ...};
  eval_summary.json        first vs last evaluation of every task (see `summarize`).
Metric names: train `loss` (the optimised, normalised loss), `cross_entropy`,
`z_loss`, `accuracy`, `grad_norm`, `learning_rate`, `tokens_per_second`, `input_tokens`
and `target_tokens` (non-padding, per step), `nonfinite_steps`; eval `<task>/loss` (cross-entropy per target token, no z-loss or
smoothing), `<task>/accuracy` (token accuracy) and `<task>/tokens`, all over every target
token; and the residue metrics of residue_eval (`<task>/residue_loss`, `.../unigram_loss`,
`.../composition_loss`, `.../gap_unigram`, intervals, `.../masking_rate`, EOS on its own).
"""
import json
import os
from typing import Mapping, Optional

import numpy as np


class EvalAccumulator:
  """Sums eval-step outputs over batches; yields per-token loss and accuracy."""

  def __init__(self):
    self.sums = {}

  def add(self, sums: Mapping[str, np.ndarray]) -> None:
    for key, value in sums.items():
      self.sums[key] = self.sums.get(key, 0.0) + float(value)

  def result(self) -> dict:
    weight = max(self.sums.get("weight", 0.0), 1.0)
    return {"loss": self.sums.get("cross_entropy", 0.0) / weight,
            "accuracy": self.sums.get("correct", 0.0) / weight,
            "tokens": self.sums.get("weight", 0.0)}


def _append_jsonl(path: str, record: dict) -> None:
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list:
  """Records of a JSON-lines file; a later record of the same step replaces an earlier
  one (a resumed run re-logs the steps after its checkpoint)."""
  if not os.path.exists(path):
    return []
  by_step = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
          continue
        by_step[record["step"]] = record
  return [by_step[s] for s in sorted(by_step)]


class MetricsWriter:
  """Writes scalars to TensorBoard and JSON lines (no-op on processes other than 0)."""

  def __init__(self, model_dir: str, enabled: bool = True):
    self.model_dir = model_dir
    self.enabled = enabled
    self._writers = {}
    if enabled:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top (imports TF)
      for run in ("train", "eval"):
        self._writers[run] = metric_writers.AsyncWriter(
            metric_writers.SummaryWriter(os.path.join(model_dir, run)))

  def write(self, run: str, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._writers[run].write_scalars(step, scalars)
    _append_jsonl(os.path.join(self.model_dir, f"{run}_metrics.jsonl"),
                  {"step": int(step), **scalars})

  def flush(self) -> None:
    for writer in self._writers.values():
      writer.flush()

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()
    self._writers = {}


RESIDUE_KEYS = ("residue_loss", "residue_accuracy", "residue_perplexity", "unigram_loss",
                "unigram_accuracy", "composition_loss", "composition_accuracy",
                "gap_unigram", "gap_composition", "residue_loss_ci_low",
                "residue_loss_ci_high", "gap_unigram_ci_low", "gap_unigram_ci_high",
                "gap_composition_ci_low", "gap_composition_ci_high", "residues",
                "sequences", "masking_rate", "eos_loss", "eos_accuracy", "eos_tokens")


def _task_metrics(record: dict, task: str, keys) -> dict:
  return {k: record[f"{task}/{k}"] for k in keys if f"{task}/{k}" in record}


def summarize(model_dir: str, tasks) -> Optional[dict]:
  """First vs last evaluation of each task from eval_metrics.jsonl (None if none).

  Per task: `residue_first` / `residue_last` (the residue metrics, intervals included;
  see residue_eval), then the all-token `loss_*` / `accuracy_*`.
  """
  records = read_jsonl(os.path.join(model_dir, "eval_metrics.jsonl"))
  if not records:
    return None
  first, last = records[0], records[-1]
  out = {"first_step": first["step"], "last_step": last["step"], "tasks": {}}
  for task in tasks:
    entry = {}
    residue_first = _task_metrics(first, task, RESIDUE_KEYS)
    if residue_first:
      entry["residue_first"] = residue_first
      entry["residue_last"] = _task_metrics(last, task, RESIDUE_KEYS)
    for metric in ("loss", "accuracy"):
      key = f"{task}/{metric}"
      if key in first and key in last:
        entry[f"{metric}_first"], entry[f"{metric}_last"] = first[key], last[key]
    out["tasks"][task] = entry
  return out


def format_eval_line(scores: Mapping[str, float]) -> str:
  """One line per evaluation: residue CE against the baselines, else all-token loss."""
  tasks = sorted({k.rsplit("/", 1)[0] for k in scores})
  parts = []
  for task in tasks:
    m = _task_metrics(scores, task, RESIDUE_KEYS + ("loss", "accuracy"))
    if "residue_loss" in m:
      parts.append(f"{task} residue CE {m['residue_loss']:.3f} (unigram "
                   f"{m['unigram_loss']:.3f}, composition {m['composition_loss']:.3f})")
    elif "loss" in m:
      parts.append(f"{task} loss {m['loss']:.3f} accuracy {m['accuracy']:.3f}")
  return "; ".join(parts)


def _interval(m: Mapping[str, float], name: str, signed: bool = False) -> str:
  fmt = "+.3f" if signed else ".3f"
  low, high = m.get(f"{name}_ci_low"), m.get(f"{name}_ci_high")
  if low is None or high is None:
    return f"{m[name]:{fmt}}"
  return f"{m[name]:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def format_summary(summary: dict) -> str:
  """Plain-text table of `summarize`'s output: residue metrics first, then all tokens."""
  lines = [f"validation, step {summary['first_step']} -> {summary['last_step']}"]
  residue_tasks = {t: m for t, m in summary["tasks"].items() if m.get("residue_last")}
  if residue_tasks:
    lines.append("residue targets only (masked residues for MLM, continuation residues "
                 "for completion; no sentinels or EOS), nats per residue, 95% bootstrap "
                 "intervals over sequences; gap = baseline - model (> 0: model better)")
    head = (f"{'task':<20} {'residues':>8} {'masked':>6} {'CE first':>8} "
            f"{'CE last [95% CI]':>22} {'acc':>5} {'unigram':>7} {'compos.':>7} "
            f"{'gap vs unigram':>24} {'gap vs composition':>24}")
    lines += [head, "-" * len(head)]
    for task, m in residue_tasks.items():
      last, first = m["residue_last"], m["residue_first"]
      masked = f"{last['masking_rate']:.1%}" if "masking_rate" in last else "-"
      lines.append(
          f"{task:<20} {last['residues']:>8,.0f} {masked:>6} {first['residue_loss']:>8.3f} "
          f"{_interval(last, 'residue_loss'):>22} {last['residue_accuracy']:>5.3f} "
          f"{last['unigram_loss']:>7.3f} {last['composition_loss']:>7.3f} "
          f"{_interval(last, 'gap_unigram', True):>24} "
          f"{_interval(last, 'gap_composition', True):>24}")
    for task, m in residue_tasks.items():
      if "eos_loss" in m["residue_last"] and "masking_rate" not in m["residue_last"]:
        last = m["residue_last"]
        lines.append(f"{task}: EOS targets {last['eos_tokens']:,.0f}, CE "
                     f"{last['eos_loss']:.3f}, accuracy {last['eos_accuracy']:.3f}")
    lines.append("")
    lines.append("all target tokens (sentinels and EOS included)")
  head = (f"{'task':<24} {'loss first':>10} {'loss last':>10} {'acc first':>10} "
          f"{'acc last':>10}")
  lines += [head, "-" * len(head)]
  for task, m in summary["tasks"].items():
    cells = [m.get(k) for k in ("loss_first", "loss_last", "accuracy_first",
                                "accuracy_last")]
    shown = " ".join(f"{c:>10.4f}" if c is not None else f"{'-':>10}" for c in cells)
    lines.append(f"{task:<24} {shown}")
  return "\n".join(lines)


def write_summary(model_dir: str, summary: dict) -> str:
  path = os.path.join(model_dir, "eval_summary.json")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  os.replace(tmp, path)
  return path
