"""Where a `train_small` step's time goes, part by part, ours against the peer.

Run: python -m benchmarks.train_parts [--preset small|tiny] [--rounds 2] [--json OUT]

The step's parts at a preset's sizes and the train cases' batch (16 x 256 tokens a side),
each timed alone, forward + backward: the attention core (scores, position bias, mask,
softmax, weighted values; at `small` b16 h8 l256 d32), the gated MLP (at `small` [4096,
256] through [256, 640] x 2 and [640, 256]), and the linear layers' matmuls on their own:
x @ W and the kernel gradient x^T dy that contracts the 4096 tokens. Ours runs once per XLA matmul
setting a train step can get (`cpu_tuning.TRAIN_DOTS_BY_KIND`: 'eigen', 'xla_default'),
each side in its own process, the processes alternating; each keeps its best round.
Prints the machine line, a table (milliseconds, or GFLOP/s for the matmuls) and the
records as one JSON line.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

from benchmarks import cases, machine
from benchmarks import records as records_lib

BATCH, LENGTH = cases.TRAIN_BATCH, cases.TRAIN_INPUT_LEN
PRESETS = ("small", "tiny")
REPEATS = 15
SIDES = ("ours eigen", "ours xla_default", "peer")


def _median_ms(fn) -> float:
  """Median milliseconds of `REPEATS` calls of `fn` after two warm-up calls."""
  fn()
  fn()
  return cases._timed(fn, REPEATS) * 1e3  # pylint: disable=protected-access


def _sizes(preset: str) -> tuple:
  """(heads, d_kv, d_model, d_ff) of `preset`."""
  from ankh3_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.preset(preset)
  return cfg.num_heads, cfg.d_kv, cfg.d_model, cfg.d_ff


def _matmuls(preset: str) -> tuple:
  """(in, out) of the linear layers' kernels: MLP in, MLP out, attention projections."""
  _, _, d_model, d_ff = _sizes(preset)
  return (d_model, d_ff), (d_ff, d_model), (d_model, d_model)


def _inputs(preset: str) -> dict:
  heads, d_kv, d_model, d_ff = _sizes(preset)
  rng = np.random.default_rng(0)
  normal = lambda *shape, scale=1.0: (rng.standard_normal(shape) * scale).astype(np.float32)
  shape = (BATCH, heads, LENGTH, d_kv)
  tokens = BATCH * LENGTH
  matmuls = _matmuls(preset)
  return {"q": normal(*shape, scale=0.3), "k": normal(*shape, scale=0.3),
          "v": normal(*shape), "d_out": normal(*shape),
          "bias": normal(1, heads, LENGTH, LENGTH), "x": normal(tokens, d_model),
          "wi_0": normal(d_model, d_ff, scale=0.06), "wi_1": normal(d_model, d_ff, scale=0.06),
          "wo": normal(d_ff, d_model, scale=0.04), "dy": normal(tokens, d_model),
          **{f"a{i}": normal(tokens, n_in) for i, (n_in, _) in enumerate(matmuls)},
          **{f"g{i}": normal(tokens, n_out) for i, (_, n_out) in enumerate(matmuls)},
          **{f"w{i}": normal(n_in, n_out) for i, (n_in, n_out) in enumerate(matmuls)}}


def _matmul_names(preset: str) -> list:
  return [(f"x @ W [{BATCH * LENGTH}, {i}] @ [{i}, {o}]",
           f"kernel gradient x^T dy [{i}, {BATCH * LENGTH}] @ [{BATCH * LENGTH}, {o}]")
          for i, o in _matmuls(preset)]


def ours(preset: str, dots: str) -> dict:
  """Our parts under XLA matmul setting `dots`, set before JAX starts its backend."""
  from ankh3_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
  if dots == "eigen":
    cpu_tuning.prefer_eigen_dots()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ankh3_jax import layers  # pylint: disable=g-import-not-at-top
  a = {name: jnp.asarray(value) for name, value in _inputs(preset).items()}
  mask = jnp.ones((BATCH, 1, 1, LENGTH), bool)
  attention = jax.jit(lambda q, k, v, b, d: jax.vjp(
      lambda q, k, v, b: layers.dot_product_attention(q, k, v, b, mask, None),
      q, k, v, b)[1](d))
  mlp = lambda x, w0, w1, wo: (jax.nn.silu(x @ w0) * (x @ w1)) @ wo
  mlp_grad = jax.jit(lambda x, w0, w1, wo, dy: jax.vjp(mlp, x, w0, w1, wo)[1](dy))
  run = lambda f, *args: lambda: jax.block_until_ready(f(*args))
  out = {"attention core fwd+bwd (ms)": _median_ms(run(attention, a["q"], a["k"], a["v"],
                                                       a["bias"], a["d_out"])),
         "gated MLP fwd+bwd (ms)": _median_ms(run(mlp_grad, a["x"], a["wi_0"], a["wi_1"],
                                                  a["wo"], a["dy"]))}
  forward = jax.jit(lambda x, w: x @ w)
  kernel_grad = jax.jit(lambda x, g: jax.lax.dot_general(x, g, (((0,), (0,)), ((), ()))))
  for i, (names, (n_in, n_out)) in enumerate(zip(_matmul_names(preset), _matmuls(preset))):
    flop = 2 * BATCH * LENGTH * n_in * n_out / 1e6  # per ms -> GFLOP/s
    out[names[0] + " (GFLOP/s)"] = flop / _median_ms(run(forward, a[f"a{i}"], a[f"w{i}"]))
    out[names[1] + " (GFLOP/s)"] = flop / _median_ms(run(kernel_grad, a[f"a{i}"],
                                                         a[f"g{i}"]))
  return out


def peer(preset: str) -> dict:
  """The same parts in PyTorch as transformers' T5 computes them (autograd backward)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  t = {name: torch.tensor(value, requires_grad=True)
       for name, value in _inputs(preset).items()}
  position_bias = t["bias"] + torch.zeros(BATCH, 1, 1, LENGTH)  # T5: bias + mask, once

  def attention():
    scores = torch.matmul(t["q"], t["k"].transpose(3, 2)) + position_bias
    weights = torch.softmax(scores.float(), dim=-1).type_as(scores)
    torch.matmul(weights, t["v"]).backward(t["d_out"].detach(), retain_graph=True)

  def mlp():
    silu = torch.nn.functional.silu
    y = (silu(t["x"] @ t["wi_0"]) * (t["x"] @ t["wi_1"])) @ t["wo"]
    y.backward(t["dy"].detach())

  out = {"attention core fwd+bwd (ms)": _median_ms(attention),
         "gated MLP fwd+bwd (ms)": _median_ms(mlp)}
  with torch.no_grad():
    for i, (names, (n_in, n_out)) in enumerate(zip(_matmul_names(preset), _matmuls(preset))):
      flop = 2 * BATCH * LENGTH * n_in * n_out / 1e6
      x, w, g = t[f"a{i}"].detach(), t[f"w{i}"].detach(), t[f"g{i}"].detach()
      out[names[0] + " (GFLOP/s)"] = flop / _median_ms(lambda: x @ w)
      out[names[1] + " (GFLOP/s)"] = flop / _median_ms(lambda: x.t() @ g)
  return out


def _in_process(side: str, preset: str) -> dict:
  """One side in a fresh process (the matmul setting is process-wide)."""
  args = ["peer", preset] if side == "peer" else ["ours", preset, side.split()[1]]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, "-m", "benchmarks.train_parts", "--part", *args],
                       capture_output=True, text=True, check=False, env=env)
  if out.returncode:
    raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _best(values: list, name: str) -> float:
  return min(values) if name.endswith("(ms)") else max(values)


def table(best: dict) -> str:
  """Markdown: a row per part, a column per side, and the peer over ours' best setting."""
  rows = ["| part | " + " | ".join(SIDES) + " | ours (best setting) / peer |",
          "|---" * (len(SIDES) + 2) + "|"]
  for name in best["peer"]:
    ours_best = _best([best[s][name] for s in SIDES[:-1]], name)
    speedup = (best["peer"][name] / ours_best if name.endswith("(ms)")
               else ours_best / best["peer"][name])
    cells = " | ".join(f"{best[s][name]:.1f}" for s in SIDES)
    rows.append(f"| {name} | {cells} | {speedup:.2f}x |")
  return "\n".join(rows)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=PRESETS, default="small")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--json", default=None, help="also write the records here")
  parser.add_argument("--part", choices=["ours", "peer"], help=argparse.SUPPRESS)
  parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.part:
    print(json.dumps(ours(*args.args) if args.part == "ours" else peer(*args.args)))
    return
  records_lib.check_json_out(parser, args.json)
  print(machine.summary_line())
  print(f"preset {args.preset}: heads, d_kv, d_model, d_ff = {_sizes(args.preset)}")
  rounds = {side: [] for side in SIDES}
  for _ in range(args.rounds):
    for side in SIDES:
      rounds[side].append(_in_process(side, args.preset))
  best = {side: {name: _best([r[name] for r in results], name) for name in results[0]}
          for side, results in rounds.items()}
  print(table(best))
  records_lib.emit({"machine": machine.describe(), "preset": args.preset, "rounds": rounds, "best": best,
                    "load_avg": os.getloadavg()}, args.json)


if __name__ == "__main__":
  main()
