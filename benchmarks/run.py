"""All benchmarks side by side with the peer, in one run; prints a markdown table.

Run: python -m benchmarks.run [--device cpu|gpu] [--only CASE ...] [--rounds N]
                              [--tuning none|retain|eigen|cpu] [--json OUT] [--work_dir DIR]
Each (case, implementation) runs in its own process, so "peak MB" is that process's
peak resident memory. The peer is Hugging Face transformers' PyTorch T5 on the same
(randomly initialised, exported) weights and the same inputs. With --rounds N every
process runs N times, ours and the peer alternating, and the table keeps each side's
best round: on a machine shared with other jobs that compares both sides at their least
disturbed (all rounds are in the JSON).

The real sizes (`cases.REAL_CASES`, CPU only) first write their random model once into
--work_dir (`benchmarks.real_models`), then print a second table, where a ratio appears
only if both sides' outputs on the first sequence agree (`agreement`).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
from typing import Optional

import numpy as np

from ankh3_jax import output_paths
from benchmarks import cases as cases_lib
from benchmarks import machine as machine_lib

PAIRED = ["train_tiny", "train_small", "embed", "complete_b1", "complete_b16"]
GOALS = {"train_tiny": 1.5, "train_small": 1.5, "embed": 2.0, "complete_b1": 3.0,
         "complete_b16": 3.0}
# bfloat16 mixed precision (issue 22 item 3): the goal holds where the CPU has bf16
# instructions; matmul_bf16 is the 2048^3 product both sides' bf16 cases rest on.
BF16_PAIRED = ["train_small_bf16", "matmul_bf16"]
PAIRED += BF16_PAIRED
GOALS.update(train_small_bf16=1.5)
REAL_GOAL = 1.5  # throughput, with no more peak memory than the peer
# Agreement of the first sequence's outputs: embeddings within this fraction of the
# peer's largest value (float32 weights: both compute in float32; bfloat16 weights: the
# peer computes in bfloat16, ours in float32), greedy tokens equal for the first N.
EMBED_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}
SAME_TOKENS = {"float32": cases_lib.REAL_COMPLETE_NEW, "bfloat16": 4}
# ... and the teacher-forced log-probability of each of those tokens within this many
# nats (a random decoder repeats one token, so equal argmaxes alone prove little).
LOG_PROB_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.2}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(case: str, impl: str, device: str, tuning: str = "none",
            work_dir: str = cases_lib.DEFAULT_WORK_DIR) -> dict:
  path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=path)
  if device == "cpu":
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run([sys.executable, "-m", "benchmarks.cases", case, impl,
                         "--device", device, "--tuning", tuning, "--work_dir", work_dir],
                        cwd=REPO, env=env, capture_output=True, text=True, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  error = (proc.stderr or proc.stdout)[-600:]
  if proc.returncode < 0:
    name = signal.Signals(-proc.returncode).name
    oom = " (out of memory? the kernel's OOM killer sends SIGKILL)" if name == "SIGKILL" else ""
    error += f"\nkilled by {name}{oom}"
  return {"case": case, "impl": impl, "error": error}


def agreement(case: str, ours: dict, peer: dict) -> dict:
  """Whether both sides' first outputs agree (`EMBED_TOLERANCE`, `SAME_TOKENS`)."""
  kind, _, param_dtype = cases_lib.parse_real_case(case)
  try:
    a, b = np.load(ours["first_output"]), np.load(peer["first_output"])
  except (KeyError, OSError, ValueError) as e:
    return {"ok": False, "detail": f"no first output to compare ({e})"}
  if a.shape != b.shape:
    return {"ok": False, "detail": f"output shapes differ: {a.shape} vs {b.shape}"}
  if kind == "embed":
    diff = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    tol = EMBED_TOLERANCE[param_dtype]
    return {"ok": diff <= tol, "detail": f"largest difference {diff:.1e} of the peer's "
                                         f"largest value (tolerance {tol:.0e})"}
  n = SAME_TOKENS[param_dtype]
  same = int(np.argmin(np.append(a == b, False)))  # leading tokens in common
  detail = f"first {same} of {len(b)} greedy tokens equal (required {n})"
  try:
    lp_a, lp_b = (np.load(r["first_log_probs"])[:same] for r in (ours, peer))
  except (KeyError, OSError, ValueError) as e:
    return {"ok": False, "detail": f"{detail}; no log-probabilities to compare ({e})"}
  diff = float(np.max(np.abs(lp_a - lp_b))) if same else float("inf")
  tol = LOG_PROB_TOLERANCE[param_dtype]
  return {"ok": same >= n and diff <= tol,
          "detail": f"{detail}, their log-probabilities within {diff:.1e} nats "
                    f"(tolerance {tol:.0e})"}


def _fmt(x: float) -> str:
  return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _goal(case: str) -> str:
  return f">= {GOALS[case]}x" if case in GOALS else ""


def table(results: dict, device: str, machine: Optional[dict] = None) -> str:
  """The markdown table, under a note: `machine_lib.summary_line`, device, load."""
  rows = ["| case | ours | peer | ours / peer | goal | ours peak MB | peer peak MB |",
          "|---|---|---|---|---|---|---|"]
  for case in PAIRED:
    if (case, "ours") not in results and (case, "peer") not in results:
      continue  # not selected (--only)
    ours, peer = results.get((case, "ours"), {}), results.get((case, "peer"), {})
    if "value" not in ours or "value" not in peer:
      err = (ours.get("error") or peer.get("error") or "not run").strip().splitlines()
      rows.append(f"| {case} | failed: {err[-1] if err else ''} | | | | | |")
      continue
    ratio = ours["value"] / peer["value"]
    rows.append(f"| {case} ({ours['unit']}) | {_fmt(ours['value'])} | {_fmt(peer['value'])} "
                f"| {ratio:.2f}x | {_goal(case)} | {ours['peak_rss_mb']:,.0f} "
                f"| {peer['peak_rss_mb']:,.0f} |")
  peak = results.get(("matmul_peak", "ours"), {})
  train = results.get(("train_small", "ours"), {})
  if "value" in peak and train.get("flops_per_s"):
    mfu = train["flops_per_s"] / peak["value"]
    rows.append(f"| MFU train_small (XLA FLOPs / {peak['dtype']} matmul peak "
                f"{_fmt(peak['value'] / 1e9)} GFLOP/s, tuning {peak.get('tuning', 'none')}) "
                f"| {mfu:.1%} | | | >= 50% "
                f"| {train['peak_rss_mb']:,.0f} | |")
  elif "value" in peak:  # measured without train_small: the peak on its own
    rows.append(f"| matmul peak ({peak['dtype']} {peak['n']}^3, ours, GFLOP/s, tuning "
                f"{peak.get('tuning', 'none')}) | {_fmt(peak['value'] / 1e9)} | | | "
                f"| {peak['peak_rss_mb']:,.0f} | |")
  data = results.get(("data", "ours"), {})
  if "value" in data and "value" in train:
    rows.append(f"| data pipeline over train_small step (tokens/s) | {_fmt(data['value'])} "
                f"| {_fmt(train['value'])} | {data['value'] / train['value']:.1f}x | >= 10x "
                f"| {data['peak_rss_mb']:,.0f} | |")
    rows.append(f"| packing efficiency (non-pad fraction, 512/512: all / inputs / targets) "
                f"| {data['packing_efficiency']:.1%} / {data['inputs_fill']:.1%} / "
                f"{data['targets_fill']:.1%} | | | >= 90% | | |")
  loads = [x for r in results.values() for x in r.get("load_avg", [])]
  tunings = sorted({r["tuning"] for r in results.values() if "tuning" in r})
  note = f"Device: {device}; tuning: {'/'.join(tunings) or 'n/a'}"
  for key, name in (("xla_flags", "XLA_FLAGS"), ("glibc_tunables", "GLIBC_TUNABLES")):
    values = {r.get(key, "") for (case, impl), r in results.items()
              if case.startswith("train") and impl == "ours" and "value" in r}
    if values:
      note += f"; our train steps' {name}: {' | '.join(sorted(values)) or '(none)'}"
  native = {r["native_cpu_kernels"] for r in results.values() if "native_cpu_kernels" in r}
  if native:
    note += f"; native CPU kernels (bfloat16 decode): {'/'.join(map(str, sorted(native)))}"
  blas = {r["blas_products"] for r in results.values() if "blas_products" in r}
  if blas:
    note += (f"; float32 products through numpy's OpenBLAS (ANKH3_JAX_BLAS, per CPU "
             f"kind): {'/'.join(map(str, sorted(blas)))}")
  if loads:
    note += f"; 1-min load average during the runs: {min(loads):.1f}-{max(loads):.1f}"
  return machine_lib.summary_line(machine) + "\n" + note + "\n\n" + "\n".join(rows)


def real_table(results: dict) -> str:
  """The real sizes' table: a ratio only where `agreement` holds, memory beside it."""
  rows = ["| case | ours | peer | ours / peer | goal | ours peak MB | peer peak MB "
          "| peak ours / peer | first outputs |",
          "|---|---|---|---|---|---|---|---|---|"]
  for case in cases_lib.REAL_CASES:
    ours, peer = results.get((case, "ours")), results.get((case, "peer"))
    if ours is None and peer is None:
      continue
    ours, peer = ours or {}, peer or {}
    if "value" not in ours or "value" not in peer:
      err = (ours.get("error") or peer.get("error") or "not run").strip().splitlines()
      rows.append(f"| {case} | failed: {err[-1] if err else ''} | | | | | | | |")
      continue
    check = results.get((case, "agreement")) or agreement(case, ours, peer)
    head = (f"| {case} ({ours['unit']}) | {_fmt(ours['value'])} | {_fmt(peer['value'])} ")
    memory = (f"| {ours['peak_rss_mb']:,.0f} | {peer['peak_rss_mb']:,.0f} "
              f"| {ours['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x ")
    if check["ok"]:
      ratio = ours["value"] / peer["value"]
      rows.append(head + f"| {ratio:.2f}x | >= {REAL_GOAL}x, peak <= 1x " + memory
                  + f"| agree: {check['detail']} |")
    else:
      rows.append(head + f"| **outputs differ: no ratio** | >= {REAL_GOAL}x, peak <= 1x "
                  + memory + f"| DIFFER: {check['detail']} |")
  return "\n".join(rows)


def _better(new: dict, old: Optional[dict]) -> bool:
  if old is None or "value" not in old:
    return True
  return "value" in new and new["value"] > old["value"]


def _prepare_real_models(jobs: list, args, results: dict, every: list, machine: dict) -> list:
  """Writes each needed real-size model once (its own process); the jobs of a preset
  whose model could not be written are dropped, with the error as their result."""
  kept = list(jobs)
  groups = {}  # (kind, preset) -> jobs: each kind loads its own parts (`parts_for`)
  for case, impl in jobs:
    if case in cases_lib.REAL_CASES:
      groups.setdefault(cases_lib.parse_real_case(case)[:2], []).append((case, impl))
  for (kind, preset), mine in groups.items():
    result = dict(measure(mine[0][0], "prepare", args.device, work_dir=args.work_dir),
                  machine=machine)
    every.append(result)
    print(f"# prepare {kind} {preset}: {json.dumps(result)}", file=sys.stderr, flush=True)
    if "error" in result:
      for job in mine:
        results[job] = dict(result, case=job[0], impl=job[1])
        kept.remove(job)
  return kept


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
  parser.add_argument("--only", nargs="*", default=None)
  parser.add_argument("--rounds", type=int, default=1,
                      help="run every process this many times, keep each side's best")
  parser.add_argument("--tuning", choices=["none", "retain", "eigen", "cpu"], default="none",
                      help="process settings of both sides (see ankh3_jax/cpu_tuning.py)")
  parser.add_argument("--json", default=None, help="also write the raw results here")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing --json file")
  parser.add_argument("--work_dir", default=cases_lib.DEFAULT_WORK_DIR,
                      help="the real sizes' random models (written once, ~28 GB for both "
                           "presets) and first outputs")
  args = parser.parse_args(argv)
  if args.json:  # before hours of measuring, not after
    try:
      output_paths.check_output_file(args.json, overwrite=args.overwrite, what="--json")
    except output_paths.OutputError as e:
      parser.error(str(e))
  jobs = [(c, i) for c in PAIRED for i in ("ours", "peer")] + [("matmul_peak", "ours")]
  if args.device == "cpu":
    jobs.append(("data", "ours"))
    jobs += [(c, i) for c in cases_lib.REAL_CASES for i in ("ours", "peer")]
  if args.only:
    jobs = [(c, i) for c, i in jobs if c in args.only]
  results, every = {}, []
  machine = machine_lib.describe()
  jobs = _prepare_real_models(jobs, args, results, every, machine)
  for round_index in range(args.rounds):
    for case, impl in jobs:
      # The MFU denominator is the machine's best matmul, whichever settings give it
      # (prefer_eigen_dots makes the 2048^3 matmul itself slower).
      tunings = {args.tuning, "none"} if case == "matmul_peak" else {args.tuning}
      for tuning in sorted(tunings):
        result = dict(measure(case, impl, args.device, tuning, args.work_dir),
                      round=round_index, machine=machine)
        every.append(result)
        if _better(result, results.get((case, impl))):
          results[(case, impl)] = result
        print(f"# {case} {impl}: {json.dumps(result)}", file=sys.stderr, flush=True)
  for case in cases_lib.REAL_CASES:
    ours, peer = results.get((case, "ours"), {}), results.get((case, "peer"), {})
    if "value" in ours and "value" in peer:
      check = dict(agreement(case, ours, peer), case=case, impl="agreement")
      results[(case, "agreement")] = check
      every.append(check)
      if not check["ok"]:
        print(f"# {case}: ours and the peer DISAGREE: {check['detail']}", file=sys.stderr)
  print(table(results, args.device, machine))
  if any(case in cases_lib.REAL_CASES for case, _ in results):
    print("\nReal sizes (random weights of the released shapes; see docs/performance.md). "
          "Peaks: each process's load, compile and timed runs; not the agreement check "
          "after them (JSON: peak_with_check_mb)\n")
    print(real_table(results))
  if args.json:
    with output_paths.atomic_file(args.json) as f:
      json.dump(every, f, indent=1)


if __name__ == "__main__":
  main()
