"""Throughput and packing efficiency of the packed pre-training input pipeline.

  python benchmarks/data_pipeline.py [--mixture ankh3_pretrain] [--batch_size 32]
      [--inputs 512] [--targets 512] [--batches 40] [--packers seqio,first_fit]

For each packer, prints a table row: packed rows/s, examples/s (segments), tokens/s
(non-pad encoder inputs + decoder targets) and the non-pad fraction of the inputs, of the
targets and of both together. `seqio` is `seqio.EncDecFeatureConverter(pack=True)`;
`first_fit` is `ankh3_jax.data.packing.FirstFitEncDecFeatureConverter`.
"""
import argparse
import time

import numpy as np
import seqio
import tensorflow as tf

import ankh3_jax.tasks  # pylint: disable=unused-import  (registers the tasks)
from ankh3_jax.data import packing

CONVERTERS = {
    "seqio": lambda: seqio.EncDecFeatureConverter(pack=True),
    "first_fit": lambda: packing.FirstFitEncDecFeatureConverter(pack=True),
}


def measure(name: str, lengths, batch_size: int, batches: int, warmup: int,
            packer: str, seed: int) -> dict:
  ds = seqio.get_dataset(name, task_feature_lengths=lengths,
                         feature_converter=CONVERTERS[packer](), dataset_split="train",
                         shuffle=True, seed=seed, num_epochs=None, batch_size=batch_size)
  it = ds.as_numpy_iterator()
  for _ in range(warmup):
    next(it)
  rows = examples = inputs = targets = 0
  start = time.perf_counter()
  for _ in range(batches):
    b = next(it)
    rows += b["encoder_input_tokens"].shape[0]
    examples += int(b["encoder_segment_ids"].max(axis=1).sum())
    inputs += int(np.count_nonzero(b["encoder_input_tokens"]))
    targets += int(np.count_nonzero(b["decoder_target_tokens"]))
  seconds = time.perf_counter() - start
  return {"packer": packer, "rows/s": rows / seconds, "examples/s": examples / seconds,
          "tokens/s": (inputs + targets) / seconds,
          "examples/row": examples / rows,
          "inputs fill": inputs / (rows * lengths["inputs"]),
          "targets fill": targets / (rows * lengths["targets"]),
          "total fill": (inputs + targets) / (rows * (lengths["inputs"] + lengths["targets"]))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mixture", default="ankh3_pretrain")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--inputs", type=int, default=512)
  parser.add_argument("--targets", type=int, default=512)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--packers", default="seqio,first_fit")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  tf.config.set_visible_devices([], "GPU")  # Leave accelerators to JAX.

  lengths = {"inputs": args.inputs, "targets": args.targets}
  rows = [measure(args.mixture, lengths, args.batch_size, args.batches, args.warmup,
                  packer, args.seed) for packer in args.packers.split(",")]
  print(f"\n{args.mixture}, inputs/targets {args.inputs}/{args.targets}, batch "
        f"{args.batch_size}, {args.batches} batches after {args.warmup} warm-up\n")
  columns = list(rows[0])
  print("| " + " | ".join(columns) + " |")
  print("|" + "---|" * len(columns))
  for row in rows:
    cells = [row["packer"]] + [
        f"{row[c]:.1%}" if "fill" in c else f"{row[c]:,.2f}" if c == "examples/row"
        else f"{row[c]:,.0f}" for c in columns[1:]]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
