"""Optimizers (optax Adafactor, the T5 default, and AdamW) and learning-rate schedules."""
import math
from typing import Callable, Optional

import gin
import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]
SCHEDULES = ("rsqrt", "linear", "cosine", "constant")


@gin.configurable
def make_schedule(name: str = "rsqrt", peak_learning_rate: float = 1e-2,
                  warmup_steps: int = 10_000, warmup: str = "linear",
                  decay_steps: Optional[int] = None, end_learning_rate: float = 0.0,
                  default_decay_steps: Optional[int] = None) -> Schedule:
  """Warm-up followed by a decay; a function of the 0-based update count.

  With s = count + 1 (the 1-based update number) and W = `warmup_steps`:
    warm-up (s < W): peak * s / W ('linear') or peak ('constant', t5x's rsqrt style);
    'rsqrt': peak * sqrt(W / s) after warm-up (t5x's 1/sqrt(max(step, W)) when
      peak = 1/sqrt(W) and warmup='constant');
    'linear' / 'cosine': from peak at W to `end_learning_rate` at `decay_steps`
      (default: the run's train steps), then flat;
    'constant': peak.
  """
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; choose from {SCHEDULES}")
  if warmup not in ("linear", "constant"):
    raise ValueError(f"warmup must be 'linear' or 'constant', got {warmup!r}")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
  total = decay_steps or default_decay_steps
  if name in ("linear", "cosine") and not total:
    raise ValueError(f"the {name!r} schedule needs decay_steps (or the run's train steps)")
  peak, end = float(peak_learning_rate), float(end_learning_rate)
  w = float(max(warmup_steps, 1))

  def schedule(count):
    s = jnp.asarray(count, jnp.float32) + 1.0
    if warmup == "linear":
      warm = peak * jnp.minimum(s / w, 1.0)
    else:
      warm = jnp.full_like(s, peak)
    if name == "rsqrt":
      decayed = peak * jnp.sqrt(w / jnp.maximum(s, w))
    elif name in ("linear", "cosine"):
      frac = jnp.clip((s - w) / max(total - w, 1.0), 0.0, 1.0)
      shape = 1.0 - frac if name == "linear" else 0.5 * (1.0 + jnp.cos(math.pi * frac))
      decayed = end + (peak - end) * shape
    else:
      decayed = jnp.full_like(s, peak)
    return jnp.where(s < w, warm, decayed)

  return schedule


def _decay_mask(params):
  """Weight decay on matrices only (not on norm scales)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


@gin.configurable
def make_optimizer(schedule: Schedule, name: str = "adafactor",
                   grad_clip_norm: Optional[float] = None,
                   weight_decay: float = 0.0,
                   # Adafactor (optax defaults = T5's).
                   decay_rate: float = 0.8,
                   multiply_by_parameter_scale: bool = True,
                   clipping_threshold: Optional[float] = 1.0,
                   momentum: Optional[float] = None,
                   min_dim_size_to_factor: int = 128,
                   # AdamW.
                   b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8
                   ) -> optax.GradientTransformation:
  """optax transformation `name` ('adafactor' or 'adamw') driven by `schedule`.

  `grad_clip_norm` clips the global gradient norm first (off by default: Adafactor
  clips its own update RMS at `clipping_threshold`). `weight_decay` is decoupled
  (AdamW / Adafactor's weight_decay_rate) and skips 1-D parameters.
  """
  if name == "adafactor":
    tx = optax.adafactor(
        learning_rate=schedule, min_dim_size_to_factor=min_dim_size_to_factor,
        decay_rate=decay_rate, multiply_by_parameter_scale=multiply_by_parameter_scale,
        clipping_threshold=clipping_threshold, momentum=momentum,
        weight_decay_rate=weight_decay or None,
        weight_decay_mask=_decay_mask if weight_decay else None)
  elif name == "adamw":
    tx = optax.adamw(learning_rate=schedule, b1=b1, b2=b2, eps=eps,
                     weight_decay=weight_decay, mask=_decay_mask)
  else:
    raise ValueError(f"unknown optimizer {name!r}; choose 'adafactor' or 'adamw'")
  if grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  return tx
