"""Train a downstream head and report held-out metrics against a trivial baseline.

  python -m ankh3_jax.downstream.finetune --model_dir MODEL --task ss3
  python -m ankh3_jax.downstream.finetune --features onehot --task contacts
  python -m ankh3_jax.downstream.finetune --model_dir MODEL --task fitness --fitness_csv gb1.csv

Tasks on the shipped structure set (train split -> test split): `ss3`, `ss8` (Q3/Q8 vs
the majority class of the train split) and `contacts` (long-range P@L/5, |i-j| >= 24, vs
random ranking, i.e. the long-range contact density). `fitness` trains on a user CSV
(FLIP GB1, TAPE fluorescence; Spearman vs 0 of a constant predictor). `--eval_csv` also
scores an SS model on a user benchmark (CB513, TS115, CASP12).

Features: frozen per-residue embeddings of `--model_dir` (default), the same encoder
fine-tuned end to end (`--finetune_encoder`), or one-hot residues (`--features onehot`,
the no-language-model baseline). Heads: ConvBERT (default) or a linear probe.
"""
import argparse
import dataclasses
import json
import sys
import time
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ankh3_jax import embed
from ankh3_jax import inference
from ankh3_jax import output_paths
from ankh3_jax import quiet
from ankh3_jax.downstream import benchmarks
from ankh3_jax.downstream import data
from ankh3_jax.downstream import features as feats
from ankh3_jax.downstream import heads
from ankh3_jax.downstream import metrics
from ankh3_jax.model import Transformer

TASKS = ("ss3", "ss8", "contacts", "fitness")
LENGTH_QUANTUM = 64        # padded lengths are multiples of this (few compiled shapes)
MIN_TRAIN_SEPARATION = 6   # contact loss ignores pairs closer in sequence


@dataclasses.dataclass(frozen=True)
class Example:
  id: str
  sequence: str
  label: np.ndarray        # [L] int (SS), [L, L] bool (contacts) or [] float (fitness)


@dataclasses.dataclass
class Result:
  """Held-out outcome of one run."""
  task: str
  metric_name: str
  metric: float
  baseline_name: str
  baseline: float
  train_examples: int
  eval_examples: int
  steps: int
  seconds: float
  extra: dict = dataclasses.field(default_factory=dict)

  @property
  def margin(self) -> float:
    return self.metric - self.baseline


# ---------------------------------------------------------------------------------------
# Examples.


def chain_examples(task: str, chains: Sequence[data.Chain]) -> list:
  """Labelled examples of an SS or contact task from shipped chains."""
  out = []
  for c in chains:
    if task == "ss3":
      label = data.encode_labels(c.ss3, data.SS3_CLASSES)
    elif task == "ss8":
      label = data.encode_labels(c.dssp8, data.SS8_CLASSES)
    elif task == "contacts":
      label = data.contact_map(c.cb)
    else:
      raise ValueError(f"task {task!r} has no shipped data; use --fitness_csv")
    out.append(Example(c.id, c.sequence, label))
  return out


def ss_benchmark_examples(task: str, records: Sequence[benchmarks.SSRecord]) -> list:
  out = []
  for r in records:
    states, classes = (r.ss3, data.SS3_CLASSES) if task == "ss3" else (r.ss8, data.SS8_CLASSES)
    if states is None:
      raise ValueError(f"benchmark record {r.id!r} has no {task} labels")
    out.append(Example(r.id, r.sequence, data.encode_labels(states, classes)))
  return out


def fitness_examples(records: Sequence[benchmarks.FitnessRecord]) -> list:
  return [Example(r.id, r.sequence, np.float32(r.target)) for r in records]


# ---------------------------------------------------------------------------------------
# Batching.


def padded_length(length: int, quantum: int = LENGTH_QUANTUM) -> int:
  return -(-length // quantum) * quantum


def make_batch(task: str, examples: Sequence[Example], inputs: Sequence[np.ndarray],
               batch_size: int, tokens: bool, quantum: int = LENGTH_QUANTUM) -> dict:
  """Pads a batch to [batch_size, padded L]; rows past len(examples) are empty.

  `inputs` are per-residue features [L, D], or token ids [L + 2] when `tokens`. L is
  rounded up to a multiple of `quantum` (one compiled shape per multiple).
  """
  length = padded_length(max(len(e.sequence) for e in examples), quantum)
  mask = np.zeros((batch_size, length), np.float32)
  if tokens:
    x = np.zeros((batch_size, length + 2), np.int32)
  else:
    x = np.zeros((batch_size, length, inputs[0].shape[-1]), np.float32)
  if task == "contacts":
    label = np.zeros((batch_size, length, length), np.float32)
  elif task == "fitness":
    label = np.zeros((batch_size,), np.float32)
  else:
    label = np.full((batch_size, length), data.IGNORE, np.int32)
  for r, (ex, inp) in enumerate(zip(examples, inputs)):
    n = len(ex.sequence)
    mask[r, :n] = 1.0
    x[r, :len(inp)] = inp
    if task == "contacts":
      label[r, :n, :n] = ex.label
    elif task == "fitness":
      label[r] = ex.label
    else:
      label[r, :n] = ex.label
  return {"inputs": x, "mask": mask, "label": label}


# ---------------------------------------------------------------------------------------
# Model, loss, predictions.


def make_head(task: str, kind: str, dropout: float) -> nn.Module:
  if task in ("ss3", "ss8"):
    classes = data.SS3_CLASSES if task == "ss3" else data.SS8_CLASSES
    return heads.ResidueClassifier(len(classes), kind=kind, dropout=dropout)
  if task == "contacts":
    return heads.ContactPredictor(kind=kind, dropout=dropout)
  if task == "fitness":
    return heads.SequenceRegressor(kind=kind, dropout=dropout)
  raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


class _Forward:
  """Features -> head outputs, through the encoder when it is fine-tuned."""

  def __init__(self, task: str, head: nn.Module, encoder_config=None):
    self.task = task
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


def _separation_mask(length: int, minimum: int) -> np.ndarray:
  idx = np.arange(length)
  return (np.abs(idx[:, None] - idx[None, :]) >= minimum).astype(np.float32)


def loss_fn(task: str, outputs, batch):
  mask = batch["mask"]
  if task in ("ss3", "ss8"):
    label = batch["label"]
    scored = (label != data.IGNORE).astype(jnp.float32) * mask
    ce = optax.softmax_cross_entropy_with_integer_labels(outputs, jnp.maximum(label, 0))
    return jnp.sum(ce * scored) / jnp.maximum(jnp.sum(scored), 1.0)
  if task == "contacts":
    weight = mask[:, :, None] * mask[:, None, :] * _separation_mask(outputs.shape[1],
                                                                  MIN_TRAIN_SEPARATION)
    bce = optax.sigmoid_binary_cross_entropy(outputs, batch["label"])
    return jnp.sum(bce * weight) / jnp.maximum(jnp.sum(weight), 1.0)
  rows = (jnp.sum(mask, axis=1) > 0).astype(jnp.float32)
  return jnp.sum(rows * (outputs - batch["label"]) ** 2) / jnp.maximum(jnp.sum(rows), 1.0)


# ---------------------------------------------------------------------------------------
# Training.


def _inputs_for(examples: Sequence[Example], features: str, encoder, progress: bool) -> list:
  """Token ids ('finetune'), one-hot ('onehot') or embeddings ('embed': `encoder` is an
  `embed.Embedder`, kept across calls so its compiled buckets are reused)."""
  sequences = [e.sequence for e in examples]
  if features == "finetune":
    return feats.token_ids(sequences, encoder.vocab_path)
  if features == "onehot":
    return feats.onehot(sequences)
  return feats.embeddings(encoder, sequences, progress=progress)


def _batches_of(examples, inputs, batch_size):
  """Evaluation batches, grouped by padded length so each shape compiles once."""
  order = sorted(range(len(examples)), key=lambda i: len(examples[i].sequence))
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    yield chunk, [examples[i] for i in chunk], [inputs[i] for i in chunk]


class Trained:
  """A trained head (and encoder, when fine-tuned) that scores example sets."""

  def __init__(self, task, params, forward, features, head, encoder, batch_size, train,
               steps, seconds, quantum):
    self.task, self.params, self.forward = task, params, forward
    self.features, self.head, self.encoder = features, head, encoder
    self.batch_size, self.train, self.steps, self.train_seconds = (batch_size, train, steps,
                                                                   seconds)
    self.quantum = quantum
    self._predict = jax.jit(lambda p, b: forward(p, b, True))

  def predict(self, examples: Sequence[Example], progress: bool = False) -> list:
    """Per example: class ids [L] (SS), contact logits [L, L] or a value (fitness)."""
    inputs = _inputs_for(examples, self.features, self.encoder, progress)
    tokens = self.features == "finetune"
    outputs = [None] * len(examples)
    for chunk, exs, ins in _batches_of(examples, inputs, self.batch_size):
      batch = make_batch(self.task, exs, ins, self.batch_size, tokens, self.quantum)
      out = np.asarray(self._predict(self.params, batch))
      for r, i in enumerate(chunk):
        n = len(examples[i].sequence)
        if self.task == "contacts":
          outputs[i] = out[r, :n, :n]
        elif self.task == "fitness":
          outputs[i] = float(out[r])
        else:
          outputs[i] = np.argmax(out[r, :n], axis=-1)
    return outputs

  def evaluate(self, examples: Sequence[Example], progress: bool = False) -> Result:
    start = time.time()
    scored = score(self.task, self.predict(examples, progress), examples, self.train)
    scored["extra"].update(features=self.features, head=self.head,
                           eval_seconds=time.time() - start)
    return Result(task=self.task, train_examples=len(self.train),
                  eval_examples=len(examples), steps=self.steps,
                  seconds=self.train_seconds, **scored)


def fit(task: str, train: Sequence[Example], *, model: Optional[inference.ModelArg] = None,
        features: str = "embed", head: str = "convbert", steps: int = 300,
        batch_size: int = 16, learning_rate: float = 1e-3,
        encoder_learning_rate: float = 1e-4, dropout: float = 0.2, seed: int = 0,
        length_quantum: int = LENGTH_QUANTUM, progress: bool = False,
        log_every: int = 0) -> Trained:
  """Trains a head on `train`.

  Args:
    features: 'embed' (frozen embeddings of `model`), 'finetune' (train `model`'s encoder
      too) or 'onehot' (no model).
    length_quantum: batches are padded to a multiple of this; one compile per multiple
      (a value >= the longest sequence gives a single compiled shape).
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
  if features not in ("embed", "finetune", "onehot"):
    raise ValueError(f"features must be 'embed', 'finetune' or 'onehot', got {features!r}")
  if features != "onehot" and model is None:
    raise ValueError(f"features={features!r} needs a model (--model_dir)")
  if not train:
    raise ValueError("no training examples")
  start_time = time.time()
  encoder = inference.resolve_model(model) if features != "onehot" else None
  if features == "embed":
    encoder = embed.Embedder(encoder)
  train_in = _inputs_for(train, features, encoder, progress)
  if task == "fitness":  # standardise targets for training; Spearman is scale-free
    targets = np.array([e.label for e in train], np.float32)
    mu, sd = float(targets.mean()), float(targets.std() or 1.0)
    fit_set = [dataclasses.replace(e, label=np.float32((e.label - mu) / sd)) for e in train]
  else:
    fit_set = list(train)

  tokens = features == "finetune"
  head_module = make_head(task, head, dropout)
  forward = _Forward(task, head_module, encoder.config if tokens else None)
  rng = jax.random.PRNGKey(seed)
  rng, init_rng = jax.random.split(rng)
  probe = make_batch(task, fit_set[:1], train_in[:1], 1, tokens)
  width = encoder.config.d_model if tokens else probe["inputs"].shape[-1]
  dummy = jnp.zeros(probe["mask"].shape + (width,), jnp.float32)
  params = {"head": head_module.init(init_rng, dummy, jnp.asarray(probe["mask"]),
                                     True)["params"]}
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 10),
                                                max(steps, 2), learning_rate * 0.05)
  optimizer = optax.adamw(schedule, weight_decay=0.01)
  if tokens:
    params["encoder"] = inference.encoder_params(encoder.params)
    enc_schedule = optax.warmup_cosine_decay_schedule(
        0.0, encoder_learning_rate, max(1, steps // 10), max(steps, 2),
        encoder_learning_rate * 0.05)
    optimizer = optax.multi_transform(
        {"head": optimizer, "encoder": optax.adamw(enc_schedule, weight_decay=0.0)},
        {"head": "head", "encoder": "encoder"})
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optimizer)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, batch, rng):
    def objective(p):
      return loss_fn(task, forward(p, batch, False, rng), batch)
    loss, grads = jax.value_and_grad(objective)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  np_rng = np.random.default_rng(seed)
  batch_size = min(batch_size, len(fit_set))
  for i in range(steps):
    pick = np_rng.choice(len(fit_set), batch_size, replace=False)
    batch = make_batch(task, [fit_set[j] for j in pick], [train_in[j] for j in pick],
                       batch_size, tokens, length_quantum)
    rng, step_rng = jax.random.split(rng)
    params, opt_state, loss = step(params, opt_state, batch, step_rng)
    if log_every and (i + 1) % log_every == 0:
      print(f"step {i + 1}/{steps} loss {float(loss):.4f}", file=sys.stderr, flush=True)
  if tokens:  # score with the fine-tuned encoder
    encoder = dataclasses.replace(encoder, params={**encoder.params, **params["encoder"]})
  return Trained(task, params, forward, features, head, encoder, batch_size, list(train),
                 steps, time.time() - start_time, length_quantum)


def train_and_evaluate(task: str, train: Sequence[Example], evaluate: Sequence[Example],
                       **kwargs) -> Result:
  """`fit` on `train`, then `evaluate` on `evaluate`."""
  return fit(task, train, **kwargs).evaluate(evaluate)


def score(task: str, outputs: list, examples: Sequence[Example],
          train: Sequence[Example]) -> dict:
  """Metric of `outputs` on `examples` and the trivial baseline (from `train`)."""
  labels = [e.label for e in examples]
  if task in ("ss3", "ss8"):
    classes = data.SS3_CLASSES if task == "ss3" else data.SS8_CLASSES
    majority = metrics.majority_class([e.label for e in train], len(classes))
    baseline = metrics.residue_accuracy([np.full_like(l, majority) for l in labels], labels)
    return dict(metric_name="Q3" if task == "ss3" else "Q8",
                metric=metrics.residue_accuracy(outputs, labels),
                baseline_name="majority class", baseline=baseline,
                extra={"majority_class": classes[majority]})
  if task == "contacts":
    return dict(metric_name="long-range P@L/5",
                metric=metrics.mean_contact_precision(outputs, labels),
                baseline_name="random ranking",
                baseline=metrics.random_contact_precision(labels),
                extra={"P@L/5 |i-j|>=12": metrics.mean_contact_precision(outputs, labels, 12)})
  return dict(metric_name="Spearman", metric=metrics.spearman(outputs, labels),
              baseline_name="constant prediction", baseline=0.0, extra={})


# ---------------------------------------------------------------------------------------
# Command line.


def _limit(items: list, n: Optional[int]) -> list:
  return items if not n else items[:n]


def load_task_data(task: str, *, fitness_csv: Optional[str] = None,
                   eval_split: str = "test", train_limit: Optional[int] = None,
                   eval_limit: Optional[int] = None):
  """(train, evaluate) examples of a task: shipped data, or a fitness CSV."""
  if task == "fitness":
    if not fitness_csv:
      raise ValueError("--task fitness needs --fitness_csv (FLIP GB1 / TAPE fluorescence)")
    records = benchmarks.load_fitness(fitness_csv)
    by_split = {}
    for r in records:
      by_split.setdefault(r.split, []).append(r)
    if "train" not in by_split or eval_split not in by_split:
      raise ValueError(f"{fitness_csv}: need 'train' and {eval_split!r} rows in its split "
                       f"column; found {sorted(by_split)}")
    return (_limit(fitness_examples(by_split["train"]), train_limit),
            _limit(fitness_examples(by_split[eval_split]), eval_limit))
  train = chain_examples(task, data.load_chains("train", limit=train_limit))
  evaluate = chain_examples(task, data.load_chains(eval_split, limit=eval_limit))
  return train, evaluate


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m ankh3_jax.downstream.finetune",
                              description=__doc__.splitlines()[0])
  p.add_argument("--task", choices=TASKS, required=True)
  p.add_argument("--model_dir", help="model directory (our format)")
  p.add_argument("--features", choices=["embed", "onehot"], default="embed",
                 help="frozen embeddings of --model_dir (default) or one-hot residues")
  p.add_argument("--finetune_encoder", action="store_true",
                 help="train the encoder together with the head (full fine-tuning)")
  p.add_argument("--head", choices=heads.KINDS, default="convbert")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--learning_rate", type=float, default=1e-3)
  p.add_argument("--encoder_learning_rate", type=float, default=1e-4)
  p.add_argument("--dropout", type=float, default=0.2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval_split", choices=["validation", "test"], default="test")
  p.add_argument("--train_limit", type=int, default=None, help="use only the first N "
                 "training examples")
  p.add_argument("--eval_limit", type=int, default=None)
  p.add_argument("--fitness_csv", help="FLIP/TAPE-style CSV for --task fitness")
  p.add_argument("--eval_csv", help="also score an ss3/ss8 model on this benchmark CSV "
                 "(CB513, TS115, CASP12)")
  p.add_argument("--output_json", help="write the results here (checked before training)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --output_json file")
  p.add_argument("--length_quantum", type=int, default=LENGTH_QUANTUM,
                 help="pad batches to multiples of this many residues (each multiple "
                 "compiles once)")
  p.add_argument("--log_every", type=int, default=0)
  quiet.add_flag(p)
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  quiet.setup(argv)
  args = build_parser().parse_args(argv)
  features = "finetune" if args.finetune_encoder else args.features
  try:
    if args.output_json:
      output_paths.check_output_file(
          args.output_json, [args.model_dir, args.fitness_csv, args.eval_csv],
          overwrite=args.overwrite, what="--output_json")
    train, evaluate = load_task_data(args.task, fitness_csv=args.fitness_csv,
                                     eval_split=args.eval_split, train_limit=args.train_limit,
                                     eval_limit=args.eval_limit)
    if args.eval_csv and args.task not in ("ss3", "ss8"):
      raise ValueError("--eval_csv is for --task ss3 or ss8")
    runs = [("shipped " + args.eval_split if args.task != "fitness" else args.eval_split,
             evaluate)]
    if args.eval_csv:
      runs.append((args.eval_csv, ss_benchmark_examples(
          args.task, benchmarks.load_secondary_structure(args.eval_csv))))
    trained = fit(args.task, train, model=args.model_dir, features=features, head=args.head,
                  steps=args.steps, batch_size=args.batch_size,
                  learning_rate=args.learning_rate,
                  encoder_learning_rate=args.encoder_learning_rate, dropout=args.dropout,
                  seed=args.seed, length_quantum=args.length_quantum, progress=True,
                  log_every=args.log_every)
    results = [(name, trained.evaluate(examples)) for name, examples in runs]
  except (ValueError, OSError) as e:
    print(f"finetune: error: {e}", file=sys.stderr)
    return 2
  report = []
  for name, r in results:
    print(f"{r.task} on {name} ({r.eval_examples} proteins, {r.steps} steps, "
          f"{r.extra['features']}/{r.extra['head']}): {r.metric_name} {r.metric:.4f} vs "
          f"{r.baseline_name} {r.baseline:.4f} (margin {r.margin:+.4f}), {r.seconds:.0f} s")
    report.append({"eval": name, **dataclasses.asdict(r), "margin": r.margin})
  if args.output_json:
    try:
      with output_paths.atomic_file(args.output_json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    except OSError as e:
      print(f"finetune: error: cannot write {args.output_json} ({e.strerror or e})",
            file=sys.stderr)
      return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
