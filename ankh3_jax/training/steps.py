"""The jitted train and eval steps (pure functions of state, batch and rng)."""
from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ankh3_jax.training import losses
from ankh3_jax.training import residue_eval
from ankh3_jax.training.state import TrainState

Batch = Mapping[str, jax.Array]
MODEL_KEYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
              "encoder_segment_ids", "decoder_segment_ids", "encoder_positions",
              "decoder_positions")
NAN_POLICIES = ("skip", "stop", "none")


def _model_inputs(batch: Batch) -> dict:
  return {k: batch[k] for k in MODEL_KEYS if k in batch}


def _loss_weights(batch: Batch) -> jax.Array:
  if "decoder_loss_weights" in batch:
    return batch["decoder_loss_weights"]
  return (batch["decoder_target_tokens"] > 0).astype(jnp.float32)


def split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
  """[B, ...] -> [n, B/n, ...], microbatch i = rows i, i+n, i+2n, ...

  Strided (not contiguous) rows keep every device's share of each microbatch equal, so
  the split needs no communication when the batch is sharded.
  """
  def split(x):
    b = x.shape[0]
    if b % num_microbatches:
      raise ValueError(f"batch size {b} is not divisible by {num_microbatches} microbatches")
    x = x.reshape((b // num_microbatches, num_microbatches) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))
  return {k: split(v) for k, v in batch.items()}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    loss_config: losses.LossConfig, schedule: Callable,
                    num_microbatches: int = 1, nan_policy: str = "skip",
                    enable_dropout: bool = False) -> Callable:
  """Returns `train_step(state, batch, rng) -> (state, metrics)`.

  Gradients are those of sum(token losses) / normaliser(global batch); with microbatches
  they are summed over a `lax.scan`, which equals the full-batch gradient. When the loss
  or the gradient norm is not finite and `nan_policy` is 'skip' or 'stop', the update
  is dropped (params and optimizer state unchanged; the step and data still advance)
  and `metrics['nonfinite']` is 1; the trainer reports the step and, for 'stop', stops.
  """
  if nan_policy not in NAN_POLICIES:
    raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")

  encoder_mlm = loss_config.encoder_mlm_weight > 0
  vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)

  def objective(sums, normalizer):
    """The optimised loss from summed terms; `normalizer` = (decoder, encoder MLM)."""
    loss = sums["loss"] / normalizer[0]
    if encoder_mlm:
      loss += loss_config.encoder_mlm_weight * sums["encoder_mlm_ce"] / normalizer[1]
    return loss

  def loss_fn(params, batch, rng, normalizer):
    inputs = _model_inputs(batch)
    if encoder_mlm:
      logits, encoder_logits = model.apply(
          {"params": params}, **inputs, enable_dropout=enable_dropout,
          rngs={"dropout": rng}, method="with_encoder_logits")
    else:
      logits = model.apply({"params": params}, **inputs, enable_dropout=enable_dropout,
                           rngs={"dropout": rng})
    sums = losses.token_losses(logits, batch["decoder_target_tokens"], _loss_weights(batch),
                               loss_config.label_smoothing, loss_config.z_loss)
    if encoder_mlm:
      labels, weights = losses.encoder_mlm_labels(batch, vocab_size,
                                                  loss_config.num_sentinels)
      enc = losses.token_losses(encoder_logits, labels, weights)
      sums.update(encoder_mlm_ce=enc["cross_entropy"], encoder_mlm_correct=enc["correct"],
                  encoder_mlm_tokens=enc["weight"])
    return objective(sums, normalizer), sums

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: Batch, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    normalizer = (losses.normalizing_factor(loss_config, _loss_weights(batch)),
                  jnp.float32(1.0))
    if encoder_mlm:  # masked residues of the global batch
      _, weights = losses.encoder_mlm_labels(batch, vocab_size, loss_config.num_sentinels)
      normalizer = (normalizer[0], jnp.maximum(jnp.sum(weights), 1.0))
    if num_microbatches == 1:
      grads, sums = grad_fn(state.params, batch, rng, normalizer)
    else:
      micro = split_microbatches(batch, num_microbatches)

      def body(carry, inputs):
        index, mb = inputs
        g, s = grad_fn(state.params, mb, jax.random.fold_in(rng, index), normalizer)
        return jax.tree.map(jnp.add, carry, (g, s)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), rng, normalizer))
      (grads, sums), _ = jax.lax.scan(
          body, zeros, (jnp.arange(num_microbatches), micro))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    loss = objective(sums, normalizer)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if nan_policy != "none":
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    weight = jnp.maximum(sums["weight"], 1.0)
    metrics = {
        "loss": loss,
        "cross_entropy": sums["cross_entropy"] / weight,
        "z_loss": sums["z_loss"] / weight,
        "accuracy": sums["correct"] / weight,
        "target_tokens": sums["weight"],
        "input_tokens": jnp.sum(batch["encoder_input_tokens"] > 0, dtype=jnp.float32),
        "grad_norm": grad_norm,
        "learning_rate": schedule(state.step),
        "nonfinite": 1.0 - finite.astype(jnp.float32),
    }
    if encoder_mlm:
      masked = jnp.maximum(sums["encoder_mlm_tokens"], 1.0)
      metrics.update(encoder_mlm_cross_entropy=sums["encoder_mlm_ce"] / masked,
                     encoder_mlm_accuracy=sums["encoder_mlm_correct"] / masked)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable:
  """Returns `eval_step(params, batch) -> sums` of cross-entropy, hits and tokens.

  A batch annotated by `residue_eval.annotate_batch` also gets `per_example`: the
  residue-level sums of every example (`residue_eval.per_example_sums`).
  """
  def eval_step(params, batch: Batch):
    logits = model.apply({"params": params}, **_model_inputs(batch), enable_dropout=False)
    weights = _loss_weights(batch)
    ce, correct, _ = losses.token_scores(logits, batch["decoder_target_tokens"])
    out = {"cross_entropy": jnp.sum(ce * weights), "correct": jnp.sum(correct * weights),
           "weight": jnp.sum(weights)}
    if "residue_weights" in batch:
      out["per_example"] = residue_eval.per_example_sums(batch, ce, correct)
    return out
  return eval_step
