"""The accuracy cost of bfloat16 mixed precision against float32, same seed and data.

Run: python -m benchmarks.bf16_accuracy [--preset tiny|small] [--steps N] [--json OUT]
Prints one JSON line: the training loss at every step of both precisions (completion
batches of the shipped validation sequences, `[S2S]` prompt = first half, target = the
rest, cycled in file order; AdamW from the same random init), and the per-residue
embedding cosine of a randomly initialised model's encoder in bfloat16 against float32.
"""
import argparse
import os
import sys
import time

import numpy as np

from benchmarks import cases
from benchmarks import records as records_lib

BATCH, INPUT_LEN, TARGET_LEN = 16, 128, 128
LEARNING_RATE = 1e-3
EMBED_SEQUENCES = 16


def completion_batches(count: int) -> list:
  """`count` batches of real sequences: prompt (first half) -> continuation, padded."""
  from ankh3_jax import vocab  # pylint: disable=g-import-not-at-top
  seqs = cases._corpus_sequences()  # pylint: disable=protected-access
  rows = []
  for seq in seqs:
    half = min(len(seq) // 2, INPUT_LEN - 2)
    enc = vocab.encode(seq[:half], prefix=vocab.S2S_TOKEN)
    tgt = vocab.encode(seq[half:half + TARGET_LEN - 1], prefix="")
    rows.append((enc, tgt))
  batches = []
  for b in range(count):
    enc = np.zeros((BATCH, INPUT_LEN), np.int32)
    tgt = np.zeros((BATCH, TARGET_LEN), np.int32)
    for r in range(BATCH):
      e, t = rows[(b * BATCH + r) % len(rows)]
      enc[r, :len(e)], tgt[r, :len(t)] = e, t
    dec_in = np.pad(tgt[:, :-1], ((0, 0), (1, 0)))
    batches.append({"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
                    "decoder_target_tokens": tgt})
  return batches


def train_losses(preset: str, dtype: str, steps: int) -> list:
  """Loss at each of `steps` AdamW steps in `dtype` (float32 parameters either way)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from ankh3_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from ankh3_jax.training import losses, state as state_lib, steps as steps_lib  # pylint: disable=g-import-not-at-top
  cfg = cases._config(preset, "cpu").replace(dtype=jnp.dtype(dtype))  # pylint: disable=protected-access
  params = cases._random_params(cfg.replace(dtype=jnp.float32))  # pylint: disable=protected-access
  tx = optax.adamw(LEARNING_RATE)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=jax.device_put(params),
                               opt_state=tx.init(params))
  step = jax.jit(steps_lib.make_train_step(
      model_lib.Transformer(cfg), tx, losses.LossConfig(z_loss=0.0),
      lambda s: LEARNING_RATE, nan_policy="none"), donate_argnums=(0,))
  out, rng = [], jax.random.key(cases.SEED)
  for batch in completion_batches(steps):
    state, metrics = step(state, jax.device_put(batch), rng)
    out.append(float(metrics["loss"]))
  return out


def embedding_cosine(preset: str) -> dict:
  """Per-residue cosine of bfloat16 to float32 embeddings (random init, real sequences)."""
  from ankh3_jax import embed as embed_lib  # pylint: disable=g-import-not-at-top
  cfg = cases._config(preset, "cpu")  # pylint: disable=protected-access
  params = cases._random_params(cfg)  # pylint: disable=protected-access
  seqs = cases._corpus_sequences()[:EMBED_SEQUENCES]  # pylint: disable=protected-access
  f32, bf16 = (embed_lib.embed_sequences((cfg, params), seqs, dtype=d, progress=False)
               for d in ("float32", "bfloat16"))
  cos = []
  for a, b in zip(f32, bf16):
    a, b = a.per_residue.astype(np.float64), b.per_residue.astype(np.float64)
    cos.append(np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))
  cos = np.concatenate(cos)
  return {"mean": float(cos.mean()), "min": float(cos.min()), "residues": int(cos.size)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--json", default=None, help="also write the result here")
  args = parser.parse_args(argv)
  records_lib.check_json_out(parser, args.json)
  start = time.perf_counter()
  f32 = train_losses(args.preset, "float32", args.steps)
  bf16 = train_losses(args.preset, "bfloat16", args.steps)
  gap = np.abs(np.asarray(bf16) - np.asarray(f32))
  result = {"preset": args.preset, "steps": args.steps, "loss_float32": f32,
            "loss_bfloat16": bf16, "max_abs_loss_gap": float(gap.max()),
            "final_loss_gap": bf16[-1] - f32[-1],
            "embedding_cosine": embedding_cosine(args.preset),
            "seconds": time.perf_counter() - start, "load_avg": os.getloadavg()[0]}
  records_lib.emit(result, args.json)


if __name__ == "__main__":
  sys.exit(main())
