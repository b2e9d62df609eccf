"""Building blocks of the Ankh3 T5: RMS norm, relative position bias, attention, MLP.

Parameters follow t5x's layout and logical axis names, so t5x-style logical axis rules
partition them: kernels are 2-D (`embed` x `joined_kv`, `embed` x `mlp`, ...).
"""
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ankh3_jax.config import T5Config

Array = jax.Array
constrain = nn.with_logical_constraint


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def fan_in_init(scale: float = 1.0):
  """Truncated-normal init with variance scale/fan_in (t5x's kernel default)."""
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


class Dense(nn.Module):
  """Bias-free projection with a 2-D kernel [in, out] carrying logical axes."""
  features: int
  axes: tuple[str, str]
  config: T5Config
  init_scale: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    kernel = _param(self, "kernel", fan_in_init(self.init_scale), (x.shape[-1], self.features),
                    self.axes, cfg.param_dtype)
    return jnp.dot(x.astype(cfg.dtype), kernel.astype(cfg.dtype))


class RMSNorm(nn.Module):
  """T5 layer norm: scale only, no mean subtraction, variance in float32."""
  config: T5Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
                            + cfg.layer_norm_epsilon)
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",),
                   cfg.param_dtype)
    return (y * scale.astype(jnp.float32)).astype(cfg.dtype)


def _buckets(relative: np.ndarray, bidirectional: bool, num_buckets: int,
             max_distance: int) -> np.ndarray:
  """T5's bucket of each relative position (key position - query position)."""
  buckets = np.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative > 0) * num_buckets
    distance = np.abs(relative)
  else:
    distance = np.maximum(-relative, 0)
  max_exact = num_buckets // 2
  # float32 like the reference implementation, so bucket edges agree exactly.
  scaled = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
            / np.float32(np.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact))
  large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
  return buckets + np.where(distance < max_exact, distance, large)


def relative_position_buckets(query_length: int, key_length: int, bidirectional: bool,
                              num_buckets: int, max_distance: int) -> np.ndarray:
  """The static [q, k] table of buckets of (key position - query position)."""
  relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  return _buckets(relative, bidirectional, num_buckets, max_distance)


def toeplitz(values: Array, query_length: int, key_length: int) -> Array:
  """[..., q + k - 1] values of offsets -(q-1)..(k-1) -> [..., q, k] with [i, j] = offset j - i.

  Built from tile/reshape/slice only (no gather), so its gradient is a cheap reduction.
  """
  n = query_length + key_length
  u = jnp.concatenate([values, jnp.zeros(values.shape[:-1] + (1,), values.dtype)], -1)
  flat = jnp.tile(u, query_length)[..., :query_length * (n - 1)]
  rows = flat.reshape(values.shape[:-1] + (query_length, n - 1))
  return rows[..., query_length - 1:query_length - 1 + key_length]


class RelativePositionBias(nn.Module):
  """Learned per-head bias of each relative-position bucket, shared by a whole stack.

  The bias depends only on the offset between positions, so it is looked up once per
  offset (as a one-hot matmul) and expanded to [q, k] as a Toeplitz matrix.
  """
  config: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, query_length: int, key_length: int) -> Array:
    cfg = self.config
    table = _param(self, "rel_embedding", nn.initializers.normal(cfg.d_model ** -0.5),
                   (cfg.num_heads, cfg.relative_attention_num_buckets),
                   ("heads", "relpos_buckets"), cfg.param_dtype)
    offsets = np.arange(-(query_length - 1), key_length)
    buckets = _buckets(offsets, self.bidirectional, cfg.relative_attention_num_buckets,
                       cfg.relative_attention_max_distance)
    one_hot = np.eye(cfg.relative_attention_num_buckets, dtype=np.float32)[buckets]
    values = jnp.dot(table.astype(jnp.float32), one_hot.T)  # [heads, q + k - 1]
    bias = toeplitz(values, query_length, key_length)  # [heads, q, k]
    return bias[None].astype(cfg.dtype)  # [1, heads, q, k]


class MultiHeadAttention(nn.Module):
  """T5 attention (no score scaling, no biases) with an optional t5x-style decode cache.

  In decode mode the first call (cache absent) records zero caches shaped like the full
  inputs; each later call takes one position, writes its key/value at `cache_index`, and
  attends to the cached positions <= that index.
  """
  config: T5Config

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Optional[Array],
               bias: Optional[Array], deterministic: bool, decode: bool = False) -> Array:
    cfg = self.config
    inner = cfg.num_heads * cfg.d_kv
    proj = functools.partial(Dense, inner, ("embed", "joined_kv"), cfg)
    split = lambda x: x.reshape(x.shape[:-1] + (cfg.num_heads, cfg.d_kv))
    # Fold 1/sqrt(d_kv) into the query init, as T5 does (scores are not scaled).
    query = split(proj(init_scale=1.0 / cfg.d_kv, name="query")(inputs_q))
    key = split(proj(name="key")(inputs_kv))
    value = split(proj(name="value")(inputs_kv))
    query = constrain(query, ("batch", "length", "heads", "kv"))
    key = constrain(key, ("batch", "length", "heads", "kv"))
    value = constrain(value, ("batch", "length", "heads", "kv"))

    if decode:
      initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if initialized:
        if query.shape[1] != 1:
          raise ValueError(f"decode steps take one position, got length {query.shape[1]}")
        index = cache_index.value
        key = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype),
                                           (0, index, 0, 0))
        value = jax.lax.dynamic_update_slice(cached_value.value,
                                             value.astype(cached_value.value.dtype),
                                             (0, index, 0, 0))
        cached_key.value, cached_value.value = key, value
        cache_index.value = index + 1
        visible = (jnp.arange(key.shape[1]) <= index)[None, None, None, :]
        mask = visible if mask is None else jnp.logical_and(mask, visible)
        if bias is not None:  # keep only the row of the current position: [1, h, 1, k]
          if bias.shape[-1] != key.shape[1]:
            raise ValueError(f"decode step: the position bias covers {bias.shape[-1]} "
                             f"positions but the cache holds {key.shape[1]}; pass "
                             f"max_decode_length={key.shape[1]}")
          bias = jax.lax.dynamic_slice_in_dim(bias, index, 1, axis=2)

    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                        preferred_element_type=jnp.float32)
    if bias is not None:
      scores = scores + bias.astype(jnp.float32)
    if mask is not None:
      scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
    weights = nn.Dropout(cfg.dropout_rate)(weights, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, value.astype(cfg.dtype))
    out = out.reshape(out.shape[:2] + (inner,))
    out = Dense(cfg.d_model, ("joined_kv", "embed"), cfg, name="out")(out)
    return constrain(out, ("batch", "length", "embed"))


_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=True),  # HF 'gelu_new'
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


class MlpBlock(nn.Module):
  """T5 feed-forward: `wo(act(wi_0 x) * wi_1 x)` when gated, else `wo(act(wi x))`."""
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    cfg = self.config
    if cfg.activation not in _ACTIVATIONS:
      raise ValueError(f"unsupported feed_forward_proj {cfg.feed_forward_proj!r}")
    act = _ACTIVATIONS[cfg.activation]
    wi = functools.partial(Dense, cfg.d_ff, ("embed", "mlp"), cfg)
    if cfg.is_gated:
      h = act(wi(name="wi_0")(x)) * wi(name="wi_1")(x)
    else:
      h = act(wi(name="wi")(x))
    h = constrain(h, ("batch", "length", "mlp"))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return Dense(cfg.d_model, ("mlp", "embed"), cfg, name="wo")(h)
