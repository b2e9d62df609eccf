"""Train/eval summaries: TensorBoard (clu metric writers), JSON lines, the final table.

Written by process 0 only, under MODEL_DIR:
  train/, eval/            TensorBoard event files (runs 'train' and 'eval');
  train_metrics.jsonl      one line per logged step: {"step": ..., "loss": ..., ...};
  eval_metrics.jsonl       one line per evaluation: {"step": ..., "<task>/loss": ...};
  eval_summary.json        first vs last evaluation of every task (see `summarize`).
Metric names: train `loss` (the optimised, normalised loss), `cross_entropy`,
`z_loss`, `accuracy`, `grad_norm`, `learning_rate`, `tokens_per_second`, `input_tokens`
and `target_tokens` (non-padding, per step), `nonfinite_steps`; eval `<task>/loss` (cross-entropy per target token, no z-loss or
smoothing), `<task>/accuracy` (token accuracy) and `<task>/tokens`.
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


def summarize(model_dir: str, tasks) -> Optional[dict]:
  """First vs last evaluation of each task from eval_metrics.jsonl (None if none)."""
  records = read_jsonl(os.path.join(model_dir, "eval_metrics.jsonl"))
  if not records:
    return None
  first, last = records[0], records[-1]
  out = {"first_step": first["step"], "last_step": last["step"], "tasks": {}}
  for task in tasks:
    entry = {}
    for metric in ("loss", "accuracy"):
      key = f"{task}/{metric}"
      if key in first and key in last:
        entry[f"{metric}_first"], entry[f"{metric}_last"] = first[key], last[key]
    out["tasks"][task] = entry
  return out


def format_summary(summary: dict) -> str:
  """Plain-text table of `summarize`'s output."""
  head = (f"validation, step {summary['first_step']} -> {summary['last_step']}\n"
          f"{'task':<24} {'loss first':>10} {'loss last':>10} {'acc first':>10} "
          f"{'acc last':>10}")
  lines = [head, "-" * len(head.splitlines()[-1])]
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
