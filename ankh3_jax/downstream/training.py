"""The one training loop of downstream heads: batches, optimizer, train step, predictions.

`HeadTrainer` holds a task's head (and the encoder, when it is fine-tuned), the optimizer
and their compiled step and forward pass; fine-tuning (`finetune.fit`) and the ablation's
probes both train through it. Everything task-specific comes from the task's record
(`tasks.TABLE`).
"""
import sys
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ankh3_jax.downstream import tasks
from ankh3_jax.model import Transformer

LENGTH_QUANTUM = 64        # padded lengths are multiples of this (few compiled shapes)


def padded_length(length: int, quantum: int = LENGTH_QUANTUM) -> int:
  return -(-length // quantum) * quantum


def make_batch(task, examples: Sequence[tasks.Example], inputs: Sequence[np.ndarray],
               batch_size: int, tokens: bool, quantum: int = LENGTH_QUANTUM) -> dict:
  """Pads a batch to [batch_size, padded L]; rows past len(examples) are empty.

  `inputs` are per-residue features [L, D], or token ids [L + 2] when `tokens`. L is
  rounded up to a multiple of `quantum` (one compiled shape per multiple). Labels are
  laid out as the task's record says (`tasks.Layout`).
  """
  layout = tasks.get(task).layout
  length = padded_length(max(len(e.sequence) for e in examples), quantum)
  mask = np.zeros((batch_size, length), np.float32)
  if tokens:
    x = np.zeros((batch_size, length + 2), np.int32)
  else:
    x = np.zeros((batch_size, length, inputs[0].shape[-1]), np.float32)
  label = layout.empty(batch_size, length)
  for r, (ex, inp) in enumerate(zip(examples, inputs)):
    mask[r, :len(ex.sequence)] = 1.0
    x[r, :len(inp)] = inp
    layout.put(label, r, ex.label)
  return {"inputs": x, "mask": mask, "label": label}


def make_optimizer(steps: int, learning_rate: float,
                   encoder_learning_rate: Optional[float] = None):
  """AdamW (weight decay 0.01) with 10% warm-up and cosine decay to 5% of the rate, global
  gradient norm clipped at 1.0; with `encoder_learning_rate`, params {'head', 'encoder'}
  and the encoder at its own rate without weight decay."""
  def schedule(rate):
    return optax.warmup_cosine_decay_schedule(0.0, rate, max(1, steps // 10), max(steps, 2),
                                              rate * 0.05)
  optimizer = optax.adamw(schedule(learning_rate), weight_decay=0.01)
  if encoder_learning_rate is not None:
    optimizer = optax.multi_transform(
        {"head": optimizer,
         "encoder": optax.adamw(schedule(encoder_learning_rate), weight_decay=0.0)},
        {"head": "head", "encoder": "encoder"})
  return optax.chain(optax.clip_by_global_norm(1.0), optimizer)


class _Forward:
  """Features -> head outputs, through the encoder when it is fine-tuned."""

  def __init__(self, head: nn.Module, encoder_config=None):
    self.head = head
    self.encoder = Transformer(encoder_config) if encoder_config is not None else None

  def __call__(self, params, batch, deterministic: bool, rng=None):
    x = batch["inputs"]
    if self.encoder is not None:
      hidden = self.encoder.apply({"params": params["encoder"]}, x,
                                  enable_dropout=not deterministic,
                                  method=Transformer.encode, rngs={"dropout": rng}
                                  if rng is not None else None)
      x = hidden[:, 1:-1].astype(jnp.float32)  # drop the prefix row (and the last pad)
    rngs = {"dropout": rng} if rng is not None else None
    return self.head.apply({"params": params["head"]}, x, batch["mask"], deterministic,
                           rngs=rngs)


def _batches_of(examples, inputs, batch_size):
  """Evaluation batches, grouped by padded length so each shape compiles once."""
  order = sorted(range(len(examples)), key=lambda i: len(examples[i].sequence))
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    yield chunk, [examples[i] for i in chunk], [inputs[i] for i in chunk]


def _window(task: tasks.Task, example: tasks.Example, inputs: np.ndarray, length: int,
            rng: np.random.Generator):
  """A random window of `length` residues of an example (whole if shorter)."""
  n = len(example.sequence)
  if n <= length:
    return example, inputs
  start = int(rng.integers(0, n - length + 1))
  end = start + length
  window = tasks.Example(example.id, example.sequence[start:end],
                         task.layout.window(example.label, start, end))
  return window, inputs[start:end]


class HeadTrainer:
  """A task's head (and encoder, when `encoder_config` is given: params {'head',
  'encoder'}, token-id inputs) with an optimizer: compiled once, reusable across seeds
  and feature sets of one width."""

  def __init__(self, task, head: nn.Module, optimizer, encoder_config=None):
    self.task = tasks.get(task)
    self.head = head
    self.optimizer = optimizer
    self.forward = _Forward(head, encoder_config)
    self.tokens = encoder_config is not None

    def step(params, opt_state, batch, rng, label_stats):
      def objective(p):
        return self.task.loss(self.forward(p, batch, False, rng), batch, label_stats)
      loss, grads = jax.value_and_grad(objective)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    self._step = jax.jit(step)
    self._predict = jax.jit(lambda p, b: self.forward(p, b, True))

  def init(self, key, sample: dict, width: int) -> dict:
    """{'head': params} for batches shaped like `sample` with `width` features."""
    dummy = jnp.zeros(sample["mask"].shape + (width,), jnp.float32)
    return {"head": self.head.init(key, dummy, jnp.asarray(sample["mask"]), True)["params"]}

  def train(self, params, examples: Sequence[tasks.Example], inputs: Sequence[np.ndarray], *,
            steps: int, batch_size: int, order: np.random.Generator, rng,
            label_stats: np.ndarray, quantum: int = LENGTH_QUANTUM,
            crop: Optional[int] = None, log_every: int = 0):
    """`params` after `steps` steps on batches drawn by `order` (without replacement
    within a batch); `rng` drives dropout. With `crop`, examples of pair tasks train on
    random windows of that many residues (features only)."""
    if crop and self.tokens:
      raise ValueError("crop works on per-residue features, not token ids")
    opt_state = self.optimizer.init(params)
    batch_size = min(batch_size, len(examples))
    for i in range(steps):
      pick = [(examples[j], inputs[j])
              for j in order.choice(len(examples), batch_size, replace=False)]
      if crop and self.task.layout.level == "pair":
        pick = [_window(self.task, e, x, crop, order) for e, x in pick]
      batch = make_batch(self.task, [e for e, _ in pick], [x for _, x in pick], batch_size,
                         self.tokens, quantum)
      rng, step_rng = jax.random.split(rng)
      params, opt_state, loss = self._step(params, opt_state, batch, step_rng, label_stats)
      if log_every and (i + 1) % log_every == 0:
        print(f"step {i + 1}/{steps} loss {float(loss):.4f}", file=sys.stderr, flush=True)
    return params

  def predict(self, params, examples: Sequence[tasks.Example],
              inputs: Sequence[np.ndarray], *, batch_size: int, label_stats: np.ndarray,
              quantum: int = LENGTH_QUANTUM) -> list:
    """Per example, the task's decoded prediction (`Task.decode`)."""
    outputs = [None] * len(examples)
    for chunk, exs, ins in _batches_of(examples, inputs, batch_size):
      batch = make_batch(self.task, exs, ins, batch_size, self.tokens, quantum)
      out = np.asarray(self._predict(params, batch))
      for r, i in enumerate(chunk):
        raw = self.task.layout.unpad(out[r], len(examples[i].sequence))
        outputs[i] = self.task.decode(raw, label_stats)
    return outputs
