"""Parameter counts of the size presets, from `jax.eval_shape` (nothing is allocated).

Run: ankh3-params   (or python -m ankh3_jax.param_count [preset ...])
"""
import argparse
import sys

import jax
import numpy as np

from ankh3_jax import config as config_lib
from ankh3_jax import model as model_lib


def count_params(cfg: config_lib.T5Config) -> dict[str, int]:
  """Parameter counts: embedding, encoder stack, decoder stack (with logits), total."""
  # Scanned: the same counts, faster to trace.
  params = model_lib.abstract_params(cfg.replace(scan_layers=True))
  size = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  counts = {
      "embedding": size(params["token_embedder"]),
      "encoder_stack": size(params["encoder"]),
      "decoder_stack": size(params["decoder"]),
  }
  # The published "encoder" figure is that of T5EncoderModel: the stack plus the embedding.
  counts["encoder"] = counts["embedding"] + counts["encoder_stack"]
  counts["total"] = counts["embedding"] + counts["encoder_stack"] + counts["decoder_stack"]
  return counts


def main(argv=None) -> int:
  """`ankh3-params` (see cli.py)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("presets", nargs="*", default=list(config_lib.PRESETS))
  args = parser.parse_args(argv)
  print(f"{'preset':<12} {'encoder':>15} {'decoder stack':>15} {'total':>15}  published encoder")
  for name in args.presets:
    counts = count_params(config_lib.preset(name))
    published = config_lib.PUBLISHED_ENCODER_PARAMS.get(name)
    note = f"{published / 1e9:.2f}B" if published else "-"
    print(f"{name:<12} {counts['encoder']:>15,} {counts['decoder_stack']:>15,} "
          f"{counts['total']:>15,}  {note}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
