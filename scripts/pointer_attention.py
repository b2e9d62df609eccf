"""The pointer diagnostic of an `ankh3-train` run's checkpoints, step by step.

  python scripts/pointer_attention.py --checkpoints runs/reference_cpu/checkpoints \
      --gin_file gin_configs/runs/reference_cpu.gin

For each checkpoint step: on the validation split's MLM examples at 15% (fixed draws,
`data.host_objectives`), the cross-attention weight that the decoder, reading sentinel k,
puts on the input position of sentinel k (best head, best layer;
`training.attention_pointer`), beside the uniform-attention value. Prints one JSON line
per step, first for a fresh initialisation. The run's model and optimizer come from its gin file (the optimizer only
shapes the checkpoint that is read).
"""
import argparse
import json
import sys

import gin
import jax

from ankh3_jax import gin_files
from ankh3_jax import model as model_lib
from ankh3_jax.data import corpus
from ankh3_jax.data import fasta
from ankh3_jax.data import host_objectives
from ankh3_jax.training import attention_pointer
from ankh3_jax.training import checkpoints
from ankh3_jax.training import optimizers
from ankh3_jax.training import state as state_lib


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoints", required=True, help="a run's checkpoints/ folder")
  parser.add_argument("--gin_file", required=True)
  parser.add_argument("--validation_fasta", default=corpus.corpus_path("validation"))
  parser.add_argument("--probability", type=float, default=0.15)
  args = parser.parse_args(argv)
  gin_files.parse([args.gin_file], [])
  lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
  config = gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
  model = model_lib.Transformer(config)
  optimizer = gin.query_parameter("ankh3_jax.training.trainer.train.optimizer")
  tx = optimizer.scoped_configurable_fn(optimizers.make_schedule())
  factory = state_lib.StateFactory(model, tx, lengths)
  layout = host_objectives.TokenLayout.from_vocabulary()
  sequences = [layout.encode(r.sequence) for r in fasta.read_fasta(args.validation_fasta)]
  batches = host_objectives.eval_batches(
      sequences, host_objectives.Objective("mlm", args.probability), lengths, 64,
      seed=1000, layout=layout)
  pointer_step = attention_pointer.make_pointer_step(model)
  checkpointer = checkpoints.Checkpointer(args.checkpoints, async_save=False)
  abstract = factory.abstract_state()
  steps = [None] + checkpointer.all_steps()
  for step in steps:
    if step is None:
      params = factory.init(jax.random.key(0)).params
    else:
      params = checkpointer.restore(abstract, step)[0].params
    row = {"step": "init" if step is None else step, **attention_pointer.pointer_attention(pointer_step, params,
                                                                     batches)}
    print(json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
