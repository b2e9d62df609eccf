"""Where our train step's thread time goes: the sgemm products by shape, and the rest.

Run: python -m benchmarks.step_profile [--preset small|tiny] [--steps 6]

One process, set up as `ankh3-train` sets up its own (huge pages, the CPU kind's matmul
setting), times `--steps` compiled train steps of the train cases (`benchmarks.cases`)
after three warm-up steps, with the sgemm route counting each call's thread time
(`cpu_kernels.counting_products`). Prints the machine line, then per product shape: its
calls, thread time a step and GFLOP/s per thread; then the step's wall time, the process's
CPU time over wall time, and the thread time left to everything else (XLA's own
operations and waits: the threads times the wall, less the products). Needs the sgemm
route (the `avx2` kind's default; `ANKH3_JAX_BLAS=1` elsewhere). Not a timed test: the
figures move with the machine's load, as the other benchmarks' do.
"""
import argparse
import json
import os
import time

from benchmarks import cases, machine


def _kind(row: dict) -> str:
  """What the product is in the step: the attention's per-head products have a batch."""
  if row["trans_a"] == -2:
    return "attention forward, fused (2 products a head)"
  if row["trans_a"] < 0:
    return "attention backward, fused (4 products a head)"
  if row["batch"] > 1:
    return "attention [q, k] by [k, d] per head"
  if row["trans_a"]:
    return "kernel gradient x^T dy"
  return "input gradient dy W^T" if row["trans_b"] else "forward x W"


def profile(preset: str, steps: int) -> dict:
  """The step's wall seconds, CPU over wall, and the products' rows (per step)."""
  from ankh3_jax import cpu_kernels  # pylint: disable=g-import-not-at-top
  if not cpu_kernels.blas_available():
    raise SystemExit("the sgemm route is off here (not the avx2 kind, no native kernels or "
                     "no OpenBLAS in numpy): set ANKH3_JAX_BLAS=1 to profile it anyway")
  cfg = cases._config(preset, "cpu")  # pylint: disable=protected-access
  run, flops = cases.our_train_step(cfg, cases._random_params(cfg),  # pylint: disable=protected-access
                                    cases._train_batch(cfg))  # pylint: disable=protected-access
  for _ in range(3):
    run()
  cpu_before, start = os.times(), time.perf_counter()
  with cpu_kernels.counting_products() as rows:
    for _ in range(steps):
      run()
  wall = (time.perf_counter() - start) / steps
  cpu_after = os.times()
  cpu = (cpu_after.user - cpu_before.user + cpu_after.system - cpu_before.system) / steps
  for row in rows:
    row.update(kind=_kind(row), calls=row["calls"] / steps, seconds=row["seconds"] / steps,
               flops=row["flops"] / steps)
  return {"preset": preset, "steps": steps, "step_s": wall, "cpu_over_wall": cpu / wall,
          "xla_flops": flops, "threads": os.cpu_count(), "products": rows}


def table(result: dict) -> str:
  """The products by shape, then the step's totals."""
  lines = ["| product | m x n x k (batch) | calls a step (fused: heads back, blocks forward) | thread ms a step | "
           "GFLOP/s a thread |", "|---|---|---|---|---|"]
  rows = sorted(result["products"], key=lambda r: -r["seconds"])
  for r in rows:
    shape = (f"{r['m']} x {r['n']} x {r['k']}" + (" (A^T)" if r["trans_a"] > 0 else "")
             + (" (B^T)" if r["trans_b"] > 0 else "")
             + (f" ({r['batch']})" if r["batch"] > 1 else ""))
    lines.append(f"| {r['kind']} | {shape} | {r['calls']:.0f} | {r['seconds'] * 1e3:,.0f} | "
                 f"{r['flops'] / r['seconds'] / 1e9:.1f} |")
  sgemm_s = sum(r["seconds"] for r in rows)
  sgemm_flops = sum(r["flops"] for r in rows)
  thread_s = result["threads"] * result["step_s"]
  lines += ["", f"Step {result['step_s']:.3f} s ({result['preset']}, the mean of "
            f"{result['steps']} steps); CPU time / wall {result['cpu_over_wall']:.2f} of "
            f"{result['threads']} threads; sgemm products {sgemm_s:.3f} thread-s a step "
            f"({sgemm_flops / 1e9:.1f} of XLA's {result['xla_flops'] / 1e9:.1f} GFLOP, "
            f"{sgemm_flops / sgemm_s / 1e9:.1f} GFLOP/s a thread); everything else "
            f"{thread_s - sgemm_s:.3f} thread-s ({result['threads']} threads x the wall, less "
            "the products)."]
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=["small", "tiny"], default="small")
  parser.add_argument("--steps", type=int, default=6)
  args = parser.parse_args(argv)
  from ankh3_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
  cpu_tuning.reexec_with_huge_pages()  # what `ankh3-train` does (--huge_pages)
  cpu_tuning.apply_train_dots_for_this_cpu()  # what `ankh3-train` does (--cpu_dots auto)
  result = profile(args.preset, args.steps)
  result["machine"] = machine.describe()
  print(machine.summary_line(result["machine"]))
  print(table(result))
  print("RESULT " + json.dumps(result))


if __name__ == "__main__":
  main()
