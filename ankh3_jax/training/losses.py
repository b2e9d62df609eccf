"""Token cross-entropy with label smoothing and z-loss, and t5x loss normalisation.

Every function returns *sums* over tokens; the caller divides by a normalising factor
for the whole (global) batch, which makes gradient accumulation over microbatches
exactly equal to one big batch.
"""
import dataclasses
from typing import Optional, Union

import gin
import jax
import jax.numpy as jnp

NUM_REAL_TARGET_TOKENS = "NUM_REAL_TARGET_TOKENS"
NUM_TOTAL_TARGET_TOKENS = "NUM_TOTAL_TARGET_TOKENS"


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Loss options (t5x defaults for T5 except the normaliser).

  loss_normalizing_factor: NUM_REAL_TARGET_TOKENS (mean over non-padding target tokens
    of the global batch), NUM_TOTAL_TARGET_TOKENS (over all target positions, padding
    included), a number (t5x's constant, e.g. 233472 = 2048 x 114), or None (plain sum).
  z_loss: weight of log(Z)^2 per token (keeps the softmax normaliser near 1).
  label_smoothing: mass spread uniformly over the other vocabulary entries.
  encoder_mlm_weight: weight of an extra encoder-side MLM loss (0: off, the Ankh3
    objective as published): at every sentinel of an MLM input, the encoder output,
    through the transposed token embedding, predicts the residue the sentinel replaced
    (cross-entropy per masked residue of the global batch). It gives the encoder a
    direct gradient to use context, which the decoder-only loss reaches only after
    the decoder has learned to find each sentinel in the input (docs/training.md).
  num_sentinels: sentinel ids are the top `num_sentinels` ids of the vocabulary.
  """
  loss_normalizing_factor: Optional[Union[str, float]] = NUM_REAL_TARGET_TOKENS
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  encoder_mlm_weight: float = 0.0
  num_sentinels: int = 226

  def __post_init__(self):
    factor = self.loss_normalizing_factor
    if isinstance(factor, str) and factor not in (NUM_REAL_TARGET_TOKENS,
                                                  NUM_TOTAL_TARGET_TOKENS):
      raise ValueError(f"unknown loss_normalizing_factor {factor!r}")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
    if not self.encoder_mlm_weight >= 0.0:
      raise ValueError(f"encoder_mlm_weight must be >= 0, got {self.encoder_mlm_weight}")


# Gin builds it (`train.loss_config = @ankh3_jax.training.losses.LossConfig()`) through a
# registered subclass: `LossConfig()` in Python never picks up a binding.
gin.external_configurable(LossConfig, module=__name__)


def encoder_mlm_labels(batch, vocab_size: int, num_sentinels: int) -> tuple:
  """(labels, weights) [batch, input length]: at each sentinel of the encoder input, the
  residue that follows the same sentinel in the targets of the same example; weight 1
  there and 0 elsewhere (completion examples have no sentinels)."""
  inputs, targets = batch["encoder_input_tokens"], batch["decoder_target_tokens"]
  segments = lambda key, tokens: batch.get(key, (tokens > 0).astype(jnp.int32))
  enc_seg = segments("encoder_segment_ids", inputs)
  dec_seg = segments("decoder_segment_ids", targets)
  shift = lambda x: jnp.pad(x[:, 1:], ((0, 0), (0, 1)))
  following, following_seg = shift(targets), shift(dec_seg)
  is_sentinel = inputs >= vocab_size - num_sentinels
  match = ((inputs[:, :, None] == targets[:, None, :])
           & (enc_seg[:, :, None] == dec_seg[:, None, :])
           & (enc_seg[:, :, None] == following_seg[:, None, :])
           & is_sentinel[:, :, None])
  labels = jnp.sum(jnp.where(match, following[:, None, :], 0), axis=-1)
  weights = (is_sentinel & (labels > 0)).astype(jnp.float32)
  return labels, weights


def normalizing_factor(config: LossConfig, weights: jax.Array) -> jax.Array:
  """The divisor of the summed loss for a batch with loss `weights` [batch, length]."""
  factor = config.loss_normalizing_factor
  if factor is None:
    return jnp.float32(1.0)
  if factor == NUM_REAL_TARGET_TOKENS:
    return jnp.maximum(jnp.sum(weights, dtype=jnp.float32), 1.0)
  if factor == NUM_TOTAL_TARGET_TOKENS:
    return jnp.float32(weights.size)
  return jnp.float32(factor)


def token_scores(logits: jax.Array, targets: jax.Array) -> tuple:
  """Per-token (cross-entropy, argmax hit, log Z), float32, without weights."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  cross_entropy = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return cross_entropy, correct, log_z


def token_losses(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                 label_smoothing: float = 0.0, z_loss: float = 0.0) -> dict:
  """Weighted sums over tokens.

  Returns:
    dict with `loss` (smoothed cross-entropy + z-loss, what is optimised),
    `cross_entropy` (unsmoothed), `z_loss`, `correct` (argmax hits) and `weight` (sum of
    weights), each a float32 scalar sum.
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  vocab = logits.shape[-1]
  cross_entropy, correct, log_z = token_scores(logits, targets)
  target_log_prob = -cross_entropy
  if label_smoothing:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    # Subtract the entropy of the smoothed target so a perfect model scores 0.
    floor = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low))
    smoothed = -(confidence * target_log_prob
                 + low * (jnp.sum(logits - log_z[..., None], axis=-1) - target_log_prob))
    smoothed = smoothed - floor
  else:
    smoothed = cross_entropy
  z_term = z_loss * jnp.square(log_z)
  total = lambda x: jnp.sum(x * weights)
  return {
      "loss": total(smoothed + z_term),
      "cross_entropy": total(cross_entropy),
      "z_loss": total(z_term),
      "correct": total(correct),
      "weight": jnp.sum(weights),
  }
