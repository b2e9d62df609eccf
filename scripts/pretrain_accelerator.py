"""Pre-trains an Ankh3 preset on one accelerator without TensorFlow, scoring residues.

For a GPU or TPU image that has JAX but not TensorFlow/seqio (the project's trainer needs
both): the model, train step, optimizer and residue metrics are the project's own
(`model.Transformer`, `steps.make_train_step`, `optimizers`, `residue_eval`); only the
examples come from `data.host_objectives` (the seqio tasks' rules in NumPy). Every
evaluation scores all four tasks (MLM 15/20/30%, completion) on the same validation
sequences with fixed draws, beside the unigram and composition baselines of the training
split, with 95% bootstrap intervals. Writes to --out_dir (which must not exist):
`curve.jsonl` (one line per evaluation), `final.json`, `encoder.npz` (the token
embedding and encoder, flattened names, `--save_dtype`) and `run.json` (the settings).

  python scripts/pretrain_accelerator.py --train_fasta train.fasta.gz \
      --validation_fasta validation.fasta.gz --objective ankh3 --preset small \
      --time_budget_s 420 --out_dir runs/gpu_ankh3

docs/pretraining.md has the runs made with it.
"""
import argparse
import json
import os
import queue
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from ankh3_jax import config as config_lib
from ankh3_jax import model as model_lib
from ankh3_jax import vocab as vocab_lib
from ankh3_jax.data import fasta
from ankh3_jax.data import host_objectives as objectives_lib
from ankh3_jax.training import attention_pointer
from ankh3_jax.training import losses
from ankh3_jax.training import optimizers
from ankh3_jax.training import residue_eval
from ankh3_jax.training import state as state_lib
from ankh3_jax.training import steps

EVAL_SEED = 1000  # the same validation examples for every run


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--train_fasta", required=True)
  p.add_argument("--validation_fasta", required=True)
  p.add_argument("--out_dir", required=True)
  p.add_argument("--objective", default="ankh3", choices=sorted(objectives_lib.MIXTURES))
  p.add_argument("--preset", default="small")
  p.add_argument("--config_overrides", type=json.loads, default={},
                 help='JSON of T5Config fields over the preset, e.g. {"d_model": 128}')
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                 help="activation dtype (parameters stay float32)")
  p.add_argument("--inputs_length", type=int, default=256)
  p.add_argument("--targets_length", type=int, default=160)
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--peak_learning_rate", type=float, default=3e-3)
  p.add_argument("--warmup_steps", type=int, default=500)
  p.add_argument("--schedule", default="rsqrt")
  p.add_argument("--encoder_mlm_weight", type=float, default=0.0)
  p.add_argument("--max_steps", type=int, default=10**9)
  p.add_argument("--time_budget_s", type=float, default=600.0,
                 help="stop training after this many seconds (evaluation excluded)")
  p.add_argument("--eval_every", type=int, default=500, help="steps between evaluations")
  p.add_argument("--eval_sequences", type=int, default=2000)
  p.add_argument("--max_train_sequences", type=int, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--save_dtype", default="float32", choices=["float32", "float16"])
  return p.parse_args(argv)


def read_tokens(path: str, layout, limit=None) -> tuple:
  records = []
  for record in fasta.read_fasta(path):
    records.append(record.sequence)
    if limit and len(records) >= limit:
      break
  return records, [layout.encode(s) for s in records]


def prefetch(iterator, size: int = 16):
  """Runs `iterator` in a thread, `size` items ahead."""
  items = queue.Queue(size)

  def work():
    try:
      for item in iterator:
        items.put(item)
    except Exception as error:  # pylint: disable=broad-except  (re-raised below)
      items.put(error)

  threading.Thread(target=work, daemon=True).start()
  while True:
    item = items.get()
    if isinstance(item, Exception):
      raise item
    yield item


def evaluate(eval_step, pointer_step, params, eval_sets: dict) -> dict:
  out = {}
  for name, batches in eval_sets.items():
    acc = residue_eval.ResidueAccumulator()
    for batch in batches:
      acc.add(np.asarray(eval_step(params, batch)["per_example"]))
    out[name] = acc.result()
    if name.startswith("mlm"):
      out[name].update(attention_pointer.pointer_attention(pointer_step, params, batches))
  return out


def count_tokens(batch: dict) -> int:
  return int(np.sum(batch["encoder_input_tokens"] > 0) + np.sum(batch["decoder_loss_weights"]))


def main(argv=None) -> int:
  args = parse_args(argv)
  os.makedirs(args.out_dir)  # refuses an existing directory: never mixes two runs
  layout = objectives_lib.TokenLayout.from_vocabulary()
  lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
  train_text, train = read_tokens(args.train_fasta, layout, args.max_train_sequences)
  _, valid = read_tokens(args.validation_fasta, layout, args.eval_sequences)
  residue_ids = [int(layout.residue_table[ord(c)]) for c in vocab_lib.RESIDUES]
  stats = residue_eval.estimate_stats(train_text, residue_ids, layout.eos_id,
                                      layout.vocab_size - layout.num_sentinels,
                                      args.train_fasta)
  del train_text
  eval_sets = {}
  for objective in objectives_lib.EVAL_OBJECTIVES:
    batches = objectives_lib.eval_batches(valid, objective, lengths, args.batch_size,
                                          seed=EVAL_SEED, layout=layout)
    eval_sets[objective.name] = [
        {k: jnp.asarray(v) for k, v in
         residue_eval.annotate_batch(b, stats, layout.vocab_size).items()}
        for b in batches]

  cfg = config_lib.preset(args.preset, dtype=getattr(jnp, args.dtype),
                         **args.config_overrides)
  model = model_lib.Transformer(cfg)
  schedule = optimizers.make_schedule(name=args.schedule,
                                      peak_learning_rate=args.peak_learning_rate,
                                      warmup_steps=args.warmup_steps)
  tx = optimizers.make_optimizer(schedule, name="adamw")
  factory = state_lib.StateFactory(model, tx, lengths)
  state = jax.jit(factory.init)(jax.random.key(args.seed))
  loss_config = losses.LossConfig(encoder_mlm_weight=args.encoder_mlm_weight)
  train_step = jax.jit(steps.make_train_step(model, tx, loss_config, schedule),
                       donate_argnums=0)
  eval_step = jax.jit(steps.make_eval_step(model))
  pointer_step = attention_pointer.make_pointer_step(model)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  settings = dict(vars(args), config=config_lib.config_to_dict(cfg), num_params=int(num_params), device=str(jax.devices()[0]),
                  jax=jax.__version__, train_sequences=len(train),
                  validation_sequences=len(valid), composition_alpha=stats.alpha)
  with open(os.path.join(args.out_dir, "run.json"), "w", encoding="utf-8") as f:
    json.dump(settings, f, indent=1)
  print(json.dumps(settings), flush=True)

  mixture = objectives_lib.MIXTURES[args.objective]
  batches = prefetch(objectives_lib.train_batches(train, mixture, lengths,
                                                  args.batch_size, args.seed + 1, layout))
  rng = jax.random.key(args.seed + 2)
  curve_path = os.path.join(args.out_dir, "curve.jsonl")
  tokens = residues = 0
  trained_s = 0.0
  step = 0

  def record(step_metrics):
    row = {"step": step, "tokens": tokens, "train_seconds": round(trained_s, 1),
           "train": step_metrics, "eval": evaluate(eval_step, pointer_step, state.params, eval_sets)}
    with open(curve_path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    brief = {k: round(v["residue_loss"], 4) for k, v in row["eval"].items()}
    gaps = {k: round(v["gap_unigram"], 4) for k, v in row["eval"].items()}
    pointer = round(row["eval"]["mlm_p15"].get("pointer_attention", 0.0), 3)
    print(f"step {step} tokens {tokens / 1e6:.1f}M {trained_s:.0f}s residue CE {brief} "
          f"gap vs unigram {gaps} pointer (p15) {pointer}", flush=True)
    return row

  record({})
  last = {}
  while step < args.max_steps and trained_s < args.time_budget_s:
    start = time.perf_counter()
    for _ in range(min(args.eval_every, args.max_steps - step)):
      batch = next(batches)
      tokens += count_tokens(batch)
      state, metrics = train_step(state, batch, rng)
      step += 1
    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
    trained_s += time.perf_counter() - start
    if not np.isfinite(last["loss"]):
      print(f"non-finite loss at step {step}", file=sys.stderr)
      return 1
    final = record(last)

  encoder = {k: state.params[k] for k in ("token_embedder", "encoder")}
  flat = traverse_util.flatten_dict(jax.device_get(encoder), sep="/")
  np.savez(os.path.join(args.out_dir, "encoder.npz"),
           **{k: np.asarray(v, args.save_dtype) for k, v in flat.items()})
  final["tokens_per_second"] = tokens / max(trained_s, 1e-9)
  with open(os.path.join(args.out_dir, "final.json"), "w", encoding="utf-8") as f:
    json.dump(final, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
