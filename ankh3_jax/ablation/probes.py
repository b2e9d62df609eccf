"""Linear probes of frozen per-residue features on the shipped structure set.

Tasks (train split -> test split):
  ss3, ss8   Q3 / Q8                        `heads.ResidueClassifier`
  contacts   long-range P@L/5 (|i-j| >= 24)  `heads.ContactPredictor` (bilinear + separation bias)
  burial     Spearman's rho, per residue    `heads.ResidueClassifier` with one output
The burial target is a residue's CB neighbour count: CB atoms of the same chain within
10 Angstrom of its CB (a standard burial / solvent-exposure measure; relative solvent
accessibility itself needs side-chain atoms, which the shipped data do not keep). The
probe regresses standardised counts with a squared error.

Heads, batching, SS/contact losses and metrics are `ankh3_jax.downstream`'s. The training
loop is here because `finetune.fit` embeds the sequences at every call, while a probe
sweep reuses one set of features for every task and seed. Contact probes train on random
128-residue windows of each chain (the [L, L] maps dominate the cost; long-range pairs
are still there) and are scored on whole chains.
"""
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ankh3_jax import embed
from ankh3_jax.downstream import data
from ankh3_jax.downstream import features as feats
from ankh3_jax.downstream import finetune
from ankh3_jax.downstream import heads
from ankh3_jax.downstream import metrics

BURIAL_RADIUS = 10.0


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  """Training settings shared by every probe (linear heads: no dropout)."""
  steps: int = 300
  batch_size: int = 16
  learning_rate: float = 1e-2
  length_quantum: int = finetune.LENGTH_QUANTUM
  contact_crop: int = 128   # contact probes train on random windows of this many residues


def burial_counts(cb: np.ndarray, radius: float = BURIAL_RADIUS) -> np.ndarray:
  """[L] int32: CB atoms of the chain within `radius` Angstrom of each residue's CB."""
  diff = cb[:, None, :] - cb[None, :, :]
  close = np.sum(diff * diff, axis=-1) < radius * radius
  return (np.sum(close, axis=1) - 1).astype(np.int32)


def task_examples(task: str, chains: Sequence[data.Chain]) -> list:
  """`finetune.Example`s of a probe task (labels as `finetune.make_batch` expects)."""
  if task == "burial":
    return [finetune.Example(c.id, c.sequence, burial_counts(c.cb)) for c in chains]
  return finetune.chain_examples(task, chains)


def features(model, *sequence_sets: Sequence[str]) -> list:
  """Per-residue features of each set of sequences: one-hot residues [L, 25] when
  `model` is None, else the frozen encoder outputs [L, d_model] of `model` (a model
  directory or (config, params); one `embed.Embedder`, so each length compiles once)."""
  if model is None:
    return [feats.onehot(sequences) for sequences in sequence_sets]
  embedder = embed.Embedder(model)
  return [feats.embeddings(embedder, sequences) for sequences in sequence_sets]


@functools.lru_cache(maxsize=None)
def _compiled(task: str, settings: ProbeSettings):
  """(head, optimizer, jitted train step, jitted forward) of a task, shared by seeds and
  feature sets (so each padded length compiles once per task)."""
  if task == "burial":
    head = heads.ResidueClassifier(1, kind="linear", dropout=0.0)
  else:
    head = finetune.make_head(task, "linear", 0.0)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, settings.learning_rate, max(1, settings.steps // 10), max(settings.steps, 2),
      settings.learning_rate * 0.05)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, weight_decay=0.01))

  def forward(params, batch):
    return head.apply({"params": params}, batch["inputs"], batch["mask"], True)

  def loss(params, batch, label_stats):
    outputs = forward(params, batch)
    if task != "burial":
      return finetune.loss_fn(task, outputs, batch)
    scored = (batch["label"] != data.IGNORE).astype(jnp.float32) * batch["mask"]
    target = (batch["label"] - label_stats[0]) / label_stats[1]
    return jnp.sum(scored * (outputs[..., 0] - target) ** 2) / jnp.maximum(
        jnp.sum(scored), 1.0)

  @jax.jit
  def train_step(params, opt_state, batch, label_stats):
    value, grads = jax.value_and_grad(loss)(params, batch, label_stats)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return head, optimizer, train_step, jax.jit(forward)


def _label_stats(task: str, examples: Sequence[finetune.Example]) -> np.ndarray:
  """(mean, std) of the burial counts of `examples`; (0, 1) for other tasks."""
  if task != "burial":
    return np.array([0.0, 1.0], np.float32)
  values = np.concatenate([e.label for e in examples]).astype(np.float32)
  return np.array([values.mean(), values.std() or 1.0], np.float32)


def _crop(example: finetune.Example, inputs: np.ndarray, length: int,
          rng: np.random.Generator):
  """A random window of `length` residues of a contact example (whole if shorter)."""
  n = len(example.sequence)
  if n <= length:
    return example, inputs
  start = int(rng.integers(0, n - length + 1))
  end = start + length
  window = finetune.Example(example.id, example.sequence[start:end],
                            example.label[start:end, start:end])
  return window, inputs[start:end]


def train_probe(task: str, examples: Sequence[finetune.Example], inputs: Sequence[np.ndarray],
                settings: ProbeSettings, seed: int):
  """Parameters of a linear probe trained on (examples, inputs); `seed` sets the head's
  initialisation and the batch order."""
  head, optimizer, train_step, _ = _compiled(task, settings)
  batch_size = min(settings.batch_size, len(examples))
  sample = finetune.make_batch(task, examples[:1], inputs[:1], 1, False,
                               settings.length_quantum)
  params = head.init(jax.random.PRNGKey(seed), jnp.asarray(sample["inputs"]),
                     jnp.asarray(sample["mask"]), True)["params"]
  opt_state = optimizer.init(params)
  stats = _label_stats(task, examples)
  order = np.random.default_rng(seed)
  for _ in range(settings.steps):
    pick = [(examples[i], inputs[i])
            for i in order.choice(len(examples), batch_size, replace=False)]
    if task == "contacts":
      pick = [_crop(e, x, settings.contact_crop, order) for e, x in pick]
    batch = finetune.make_batch(task, [e for e, _ in pick], [x for _, x in pick], batch_size,
                                False, settings.length_quantum)
    params, opt_state, _ = train_step(params, opt_state, batch, stats)
  return params


def predict(task: str, params, examples: Sequence[finetune.Example],
            inputs: Sequence[np.ndarray], settings: ProbeSettings) -> list:
  """Per example: class ids [L] (SS), contact logits [L, L] or burial scores [L]."""
  _, _, _, forward = _compiled(task, settings)
  order = sorted(range(len(examples)), key=lambda i: len(examples[i].sequence))
  outputs = [None] * len(examples)
  for start in range(0, len(order), settings.batch_size):
    chunk = order[start:start + settings.batch_size]
    batch = finetune.make_batch(task, [examples[i] for i in chunk], [inputs[i] for i in chunk],
                                settings.batch_size, False, settings.length_quantum)
    out = np.asarray(forward(params, batch))
    for row, i in enumerate(chunk):
      n = len(examples[i].sequence)
      if task == "contacts":
        outputs[i] = out[row, :n, :n]
      elif task == "burial":
        outputs[i] = out[row, :n, 0]
      else:
        outputs[i] = np.argmax(out[row, :n], axis=-1)
  return outputs


def score(task: str, outputs: list, test: Sequence[finetune.Example],
          train: Sequence[finetune.Example]) -> dict:
  """{metric, baseline, metric_name, baseline_name, extra} of a probe on `test`."""
  if task != "burial":
    scored = finetune.score(task, outputs, test, train)
  else:
    rho = metrics.spearman(np.concatenate(outputs), np.concatenate([e.label for e in test]))
    scored = dict(metric_name="Spearman rho (per residue)", metric=rho,
                  baseline_name="constant prediction", baseline=0.0, extra={})
  scored["extra"] = {k: (v if isinstance(v, str) else float(v))
                     for k, v in scored["extra"].items()}
  return {**scored, "metric": float(scored["metric"]), "baseline": float(scored["baseline"])}


def run_probe(task: str, train: Sequence[finetune.Example], train_inputs: Sequence[np.ndarray],
              test: Sequence[finetune.Example], test_inputs: Sequence[np.ndarray],
              settings: ProbeSettings, seed: int) -> dict:
  """Trains one probe and scores it on `test` (see `score`)."""
  params = train_probe(task, train, train_inputs, settings, seed)
  return score(task, predict(task, params, test, test_inputs, settings), test, train)
