"""Optimizers and learning-rate schedules.

An optimizer is a factory `schedule -> optax.GradientTransformation`, one per optimizer
(`adafactor`, the T5 default, and `adamw`), or any optax optimizer by name
(`from_optax`); `make_optimizer` picks one by name. The trainer receives its factory as
an argument (gin: `train.optimizer = @ankh3_jax.training.optimizers.adafactor`).
"""
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


def _clipped(tx: optax.GradientTransformation,
             grad_clip_norm: Optional[float]) -> optax.GradientTransformation:
  """`tx` after clipping the global gradient norm to `grad_clip_norm` (None: no clip)."""
  if not grad_clip_norm:
    return tx
  return optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)


def adafactor(schedule: Schedule, decay_rate: float = 0.8,
              multiply_by_parameter_scale: bool = True,
              clipping_threshold: Optional[float] = 1.0, momentum: Optional[float] = None,
              min_dim_size_to_factor: int = 128, weight_decay: float = 0.0,
              grad_clip_norm: Optional[float] = None) -> optax.GradientTransformation:
  """optax Adafactor with T5's defaults (factored second moments, update RMS clipped at
  `clipping_threshold`); `weight_decay` is decoupled and skips 1-D parameters."""
  return _clipped(optax.adafactor(
      learning_rate=schedule, min_dim_size_to_factor=min_dim_size_to_factor,
      decay_rate=decay_rate, multiply_by_parameter_scale=multiply_by_parameter_scale,
      clipping_threshold=clipping_threshold, momentum=momentum,
      weight_decay_rate=weight_decay or None,
      weight_decay_mask=_decay_mask if weight_decay else None), grad_clip_norm)


def adamw(schedule: Schedule, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8,
          weight_decay: float = 0.0,
          grad_clip_norm: Optional[float] = None) -> optax.GradientTransformation:
  """optax AdamW; `weight_decay` skips 1-D parameters (norm scales)."""
  return _clipped(optax.adamw(learning_rate=schedule, b1=b1, b2=b2, eps=eps,
                              weight_decay=weight_decay, mask=_decay_mask), grad_clip_norm)


def from_optax(schedule: Schedule, name: str, hyperparameters: Optional[dict] = None,
               grad_clip_norm: Optional[float] = None) -> optax.GradientTransformation:
  """Any optax optimizer by its name: `optax.<name>(learning_rate=schedule,
  **hyperparameters)`, e.g. name='lion', hyperparameters={'b2': 0.98}."""
  make = getattr(optax, name, None)
  if not callable(make) or name.startswith("_"):
    raise ValueError(f"unknown optimizer {name!r}: neither {sorted(OPTIMIZERS)} nor an "
                     "optax optimizer")
  try:
    tx = make(learning_rate=schedule, **dict(hyperparameters or {}))
  except TypeError as e:
    raise ValueError(f"optax.{name}: {e}") from e
  return _clipped(tx, grad_clip_norm)


# The factories known by name; anything else is looked up in optax (`from_optax`).
OPTIMIZERS = {"adafactor": adafactor, "adamw": adamw}
OptimizerFactory = Callable[[Schedule], optax.GradientTransformation]


def make_optimizer(schedule: Schedule, name: str = "adafactor",
                   **hyperparameters) -> optax.GradientTransformation:
  """The optimizer `name` (a factory of OPTIMIZERS, else optax's) with `hyperparameters`
  (that factory's own, plus `grad_clip_norm`) driven by `schedule`."""
  if name in OPTIMIZERS:
    try:
      return OPTIMIZERS[name](schedule, **hyperparameters)
    except TypeError as e:
      raise ValueError(f"optimizer {name!r}: {e}") from e
  clip = hyperparameters.pop("grad_clip_norm", None)
  return from_optax(schedule, name, hyperparameters, grad_clip_norm=clip)


# Gin binds the factories (`train.optimizer = @ankh3_jax.training.optimizers.adamw`,
# `ankh3_jax.training.optimizers.adamw.b2 = 0.95`) through registered copies: calling
# them from Python never picks up a binding.
for _factory in (adafactor, adamw, from_optax):
  gin.external_configurable(_factory, module=__name__)
