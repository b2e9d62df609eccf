"""Where a real-size greedy completion call's time goes, each side in its own process.

Run: python -m benchmarks.completion_profile [--presets ankh_base ankh3_large] [--json OUT]

Per preset and side (ours, the peer), on the cached random model of the
`complete_<preset>` case (`benchmarks.real_models`; `python -m benchmarks.cases
complete_<preset> prepare` writes it) and its prompts: the whole call, the encoder alone,
and a decode step as (call - encoder) / new tokens, with the decoder's weights read per
second. Then what a step is made of, alone: GB/s of kernel read by few-row products over
`KERNELS` chained [1536, 3840] float32 kernels (beyond any cache), in each kernel layout
and XLA matmul backend, against torch's `F.linear`; and each side's streaming read (a sum
over 1 GiB). Prints a table and the records as one JSON line.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks import cases, machine
from benchmarks import records as records_lib

KERNEL_IN, KERNEL_OUT, KERNELS = 1536, 3840, 40
ROWS = (1, 2, 4, 8, 16)
CALLS = 3


def _median_seconds(fn, calls: int = CALLS) -> float:
  fn()
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _prompts(preset: str) -> list:
  batch = cases.REAL_COMPLETE_BATCH[preset]
  return [s[:cases.REAL_COMPLETE_PROMPT] for s in cases._corpus_sequences()[:batch]]  # pylint: disable=protected-access


def _model_paths(preset: str) -> dict:
  from benchmarks import real_models  # pylint: disable=g-import-not-at-top
  paths = real_models.cached(preset, cases.DEFAULT_WORK_DIR, real_models.parts_for("complete"))
  if paths is None:
    raise SystemExit(f"no {preset} model: run `python -m benchmarks.cases "
                     f"complete_{preset} prepare` first")
  return paths


def ours_call(preset: str) -> dict:
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from ankh3_jax import complete, inference, vocab  # pylint: disable=g-import-not-at-top
  from ankh3_jax.model import Transformer  # pylint: disable=g-import-not-at-top
  prompts, new = _prompts(preset), cases.REAL_COMPLETE_NEW
  loaded = inference.resolve_model(_model_paths(preset)["ours"], "float32")
  loaded = dataclasses.replace(loaded, params=jax.device_put(loaded.params))
  call = _median_seconds(lambda: complete.complete(loaded, prompts, max_new_tokens=new,
                                                   batch_size=len(prompts)))
  rows = [vocab.encode(p, prefix=vocab.S2S_TOKEN) for p in prompts]
  tokens = inference.pad_rows(rows, inference.length_bucket(max(map(len, rows)),
                                                            complete.MIN_ENCODER_BUCKET))
  module = Transformer(loaded.config)
  encode = jax.jit(lambda p, t: module.apply({"params": p}, t, enable_dropout=False,
                                             method=Transformer.encode))
  with inference.matmul_precision("float32"):
    encoder = _median_seconds(lambda: encode(loaded.params, tokens).block_until_ready())
  decoder_bytes = sum(x.nbytes for x in jax.tree.leaves(loaded.params["decoder"]))
  return {"call_s": call, "encoder_s": encoder, "encoder_tokens": list(tokens.shape),
          "decoder_bytes": decoder_bytes, "decoder_kernels": loaded.config.decoder_kernels}


def peer_call(preset: str) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from ankh3_jax import vocab  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  prompts, new = _prompts(preset), cases.REAL_COMPLETE_NEW
  model = transformers.T5ForConditionalGeneration.from_pretrained(
      _model_paths(preset)["hf"], dtype=torch.float32).eval()
  call = _median_seconds(lambda: cases._peer_complete(model, prompts, new))  # pylint: disable=protected-access
  rows = [vocab.encode(p, prefix=vocab.S2S_TOKEN) for p in prompts]
  ids = torch.zeros((len(rows), max(map(len, rows))), dtype=torch.long)
  for r, row in enumerate(rows):
    ids[r, :len(row)] = torch.tensor(row)
  with torch.inference_mode():
    encoder = _median_seconds(lambda: model.encoder(input_ids=ids, attention_mask=ids > 0))
  decoder_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                      if n.startswith("decoder.") or n.startswith("lm_head."))
  return {"call_s": call, "encoder_s": encoder, "encoder_tokens": list(ids.shape),
          "decoder_bytes": decoder_bytes}


def ours_products() -> dict:
  """GB/s of kernel read, per rows: each layout and XLA matmul backend; and a 1 GiB sum."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ankh3_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  in_out = [jnp.asarray(rng.standard_normal((KERNEL_IN, KERNEL_OUT), np.float32))
            for _ in range(KERNELS)]
  out_in = [jnp.asarray(np.asarray(k).T.copy()) for k in in_out]
  read = sum(k.nbytes for k in in_out)
  forms = {  # name -> (kernels, product of rows [R, in] and one kernel -> [R, out])
      "rows @ [in, out]": (in_out, lambda x, k: x @ k),
      "[rows, in] x [out, in] on in": (out_in, lambda x, k: jax.lax.dot_general(
          x, k, (((1,), (1,)), ((), ())))),
      "[out, in] @ rows^T": (out_in, lambda x, k: jax.lax.optimization_barrier(k @ x.T).T),
  }
  out = {}
  for name, (kernels, product) in forms.items():
    for backend, options in (("eigen", cpu_tuning.eigen_dot_options()), ("default", None)):
      chain = jax.jit(lambda x, ks, product=product: sum(product(x, k).sum() for k in ks),
                      compiler_options=options)
      for rows in ROWS:
        x = jnp.ones((rows, KERNEL_IN), jnp.float32)
        with jax.default_matmul_precision("highest"):
          seconds = _median_seconds(lambda: chain(x, kernels).block_until_ready())
        out[f"{name}, {backend}, {rows} rows"] = read / seconds / 1e9
  big = jnp.ones((1 << 28,), jnp.float32)
  total = jax.jit(jnp.sum)
  out["sum over 1 GiB"] = big.nbytes / _median_seconds(
      lambda: total(big).block_until_ready()) / 1e9
  return out


def peer_products() -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  kernels = [torch.randn(KERNEL_OUT, KERNEL_IN) for _ in range(KERNELS)]
  read = sum(k.numel() * 4 for k in kernels)
  out = {}
  with torch.inference_mode():
    for rows in ROWS:
      x = torch.ones(rows, KERNEL_IN)
      seconds = _median_seconds(
          lambda: [torch.nn.functional.linear(x, k).sum() for k in kernels])
      out[f"F.linear [out, in], {rows} rows"] = read / seconds / 1e9
    big = torch.ones(1 << 28)
    out["sum over 1 GiB"] = big.numel() * 4 / _median_seconds(lambda: big.sum()) / 1e9
  return out


PARTS = {"ours_call": ours_call, "peer_call": peer_call, "ours_products": ours_products,
         "peer_products": peer_products}


def _in_process(part: str, *args) -> dict:
  """One part in a fresh process (its own memory; ours and the peer never share one)."""
  out = subprocess.run([sys.executable, "-m", "benchmarks.completion_profile", "--part",
                        part, *args], capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f"{part} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", nargs="+", default=list(cases.REAL_PRESETS),
                      choices=cases.REAL_PRESETS)
  parser.add_argument("--json", default=None, help="also write the records here")
  parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
  parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.part:
    print(json.dumps(PARTS[args.part](*args.args)))
    return
  records_lib.check_json_out(parser, args.json)
  print(machine.summary_line())
  records = {"machine": machine.describe(), "calls": {}, "products": {}}
  print("| preset | side | call s | encoder s [rows, tokens] | decode step s | decoder read |")
  print("|---|---|---|---|---|---|")
  for preset in args.presets:
    for side in ("ours", "peer"):
      r = _in_process(f"{side}_call", preset)
      r["step_s"] = (r["call_s"] - r["encoder_s"]) / cases.REAL_COMPLETE_NEW
      r["decoder_GBps"] = r["decoder_bytes"] / r["step_s"] / 1e9
      records["calls"][f"{preset} {side}"] = r
      print(f"| {preset} | {side} | {r['call_s']:.2f} | {r['encoder_s']:.2f} "
            f"{r['encoder_tokens']} | {r['step_s']:.3f} | {r['decoder_GBps']:.1f} GB/s |")
  for side in ("ours", "peer"):
    records["products"][side] = _in_process(f"{side}_products")
    for name, gbps in records["products"][side].items():
      print(f"{side}: {name}: {gbps:.1f} GB/s")
  records["load_avg"] = os.getloadavg()
  records_lib.emit(records, args.json)


if __name__ == "__main__":
  sys.exit(main())
