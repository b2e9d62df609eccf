"""Building blocks of the Ankh3 T5: RMS norm, relative position bias, attention, MLP.

Parameters follow t5x's layout and logical axis names, so t5x-style logical axis rules
partition them: kernels are 2-D (`embed` x `joined_kv`, `embed` x `mlp`, ...).
"""
import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ankh3_jax import cpu_kernels
from ankh3_jax.config import ATTENTION_IMPLS, T5Config

Array = jax.Array
constrain = nn.with_logical_constraint


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def fan_in_init(scale: float = 1.0):
  """Truncated-normal init with variance scale/fan_in (t5x's kernel default)."""
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


def cast_when_used(param: Array, x: Array, dtype) -> Array:
  """`param` in `dtype`; a widening conversion is made to wait for `x`, the layer's input.

  Weights stored narrower than they compute (bfloat16 weights, float32 computation)
  are converted by XLA:CPU all at the start of a program otherwise, so every layer's
  float32 copy is alive at once: the whole model again (1.7 GB of temporaries for
  `ankh_base`'s encoder). `optimization_barrier` does not hold there (it is expanded
  before scheduling), so the conversion takes a data dependence on `x`: an exact zero
  from its first element, finite even when that is inf or NaN.
  """
  if jnp.dtype(param.dtype).itemsize >= jnp.dtype(dtype).itemsize:
    return param.astype(dtype)  # same width or narrowing: no larger copy to hold back
  first = jax.lax.stop_gradient(x.reshape(-1)[0])
  zero = (first != first).astype(jnp.float32) * 0
  if param.dtype == jnp.bfloat16 and jnp.dtype(dtype) == jnp.float32:
    return _widen_bfloat16(param, zero)
  return param.astype(dtype) + zero.astype(dtype)


@jax.custom_jvp
def _widen_bfloat16(param: Array, zero: Array) -> Array:
  """`param` as float32, widened as bits (a bfloat16 is the top half of its float32)
  with `zero` joined before: in a decode loop XLA hoists a loop-invariant conversion out
  of the loop, which kept a float32 copy of the whole decoder (1.1 GB at `ankh_base`).
  Differentiates as `astype` (bit operations have no gradient)."""
  bits = jax.lax.bitcast_convert_type(param, jnp.uint16) + jax.lax.bitcast_convert_type(
      zero.astype(jnp.bfloat16), jnp.uint16)
  return jax.lax.bitcast_convert_type(bits.astype(jnp.uint32) << 16, jnp.float32)


@_widen_bfloat16.defjvp
def _widen_bfloat16_jvp(primals, tangents):
  return _widen_bfloat16(*primals), tangents[0].astype(jnp.float32)


class Dense(nn.Module):
  """Bias-free projection with a 2-D kernel [in, out] carrying logical axes.

  `out_in`: the kernel is held as [out, in] (axes swapped with it) and the product is
  computed as kernel @ x^T. For a decode step's few rows XLA:CPU then streams the weights
  at the memory's speed: [2, 1536] x [1536, 3840] products at 16 GB/s against 9 GB/s
  as x @ [in, out] (the machine reads 17-18 GB/s; docs/performance.md). bfloat16
  kernels computing in float32 go through `cpu_kernels.bf16_rows_product` there.
  """
  features: int
  axes: tuple[str, str]
  config: T5Config
  init_scale: float = 1.0
  out_in: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    rows = x.reshape(-1, x.shape[-1]).astype(cfg.dtype)
    if self.out_in:
      kernel = _param(self, "kernel", _swapped(fan_in_init(self.init_scale)),
                      (self.features, x.shape[-1]), self.axes[::-1], cfg.param_dtype)
      if (kernel.dtype == jnp.bfloat16 and rows.dtype == jnp.float32
          and rows.shape[0] <= cpu_kernels.MAX_ROWS and cpu_kernels.available()):
        y = cpu_kernels.bf16_rows_product(kernel, rows)  # widened as it streams
      else:
        # The barrier keeps XLA from folding the transpose into the product ([rows, out]
        # again, the slow form).
        y = jax.lax.optimization_barrier(
            jnp.dot(cast_when_used(kernel, x, cfg.dtype), rows.T)).T
    else:
      kernel = _param(self, "kernel", fan_in_init(self.init_scale),
                      (x.shape[-1], self.features), self.axes, cfg.param_dtype)
      kernel = cast_when_used(kernel, x, cfg.dtype)
      # Not under remat_policy 'dots', which saves XLA's dots (not custom calls) only.
      if cfg.remat_policy != "dots" and cpu_kernels.use_blas(rows.shape[0], rows, kernel):
        y = cpu_kernels.blas_matmul(rows, kernel)  # sgemm, forward and backward
      else:
        # As a 2-D matmul: with the leading axes flattened, XLA:CPU computes the kernel
        # gradient without transposing the [tokens, features] operands.
        y = jnp.dot(rows, kernel)
    return y.reshape(x.shape[:-1] + (self.features,))


def _swapped(init):
  """`init` for the [out, in] shape: drawn as [in, out] (fan-in is `in`), then swapped."""
  return lambda key, shape, dtype: init(key, shape[::-1], dtype).T


# Decode steps fuse their projections only while the fused kernels, over the whole
# decoder, stay within this: XLA keeps their concatenation beside the parameters.
FUSED_COPY_LIMIT_BYTES = 64 << 20


def fused_copy_bytes(config: T5Config) -> int:
  """Bytes of the kernels `fused_projections` puts side by side, over the decoder."""
  per_layer = 3 * config.num_heads * config.d_kv + (2 * config.d_ff if config.is_gated else 0)
  return (config.num_decoder_layers * config.d_model * per_layer
          * jnp.dtype(config.dtype).itemsize)


def fused_projections(module: nn.Module, x: Array, names: tuple[str, ...]) -> Optional[list]:
  """`[Dense_n(x) for n in names]` for `module`'s Dense children, as one matmul.

  For decode steps of small models, whose few rows make each call's overhead dominate:
  one product with the kernels side by side replaces len(names) calls. XLA hoists the
  concatenation of the loop-invariant kernels out of the decode loop, a copy of them
  alive for the whole program: at `ankh_base` 600 MB for no measurable speed (its steps
  are bound by reading the weights), so above `FUSED_COPY_LIMIT_BYTES` this returns None,
  as it does when the children's kernels do not exist yet (at init): the caller then
  calls them one by one.
  """
  if fused_copy_bytes(module.config) > FUSED_COPY_LIMIT_BYTES or module.out_in:
    return None
  params = module.variables.get("params", {})
  if not all(n in params for n in names):
    return None
  kernels = [nn.meta.unbox(params[n]["kernel"]) for n in names]
  dtype = module.config.dtype
  y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(dtype),
              cast_when_used(jnp.concatenate(kernels, axis=1), x, dtype))
  ends = np.cumsum([k.shape[1] for k in kernels])[:-1]
  return [part.reshape(x.shape[:-1] + (part.shape[-1],))
          for part in jnp.split(y, ends, axis=-1)]


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


def _sum_middle(x: Array) -> Array:
  """[a, m, n] -> [a, n] summed over m, as a batched matmul with ones.

  XLA:CPU's reductions over a non-minor axis are very slow (tens of times slower than
  memory bandwidth); the same sum as a dot runs at matmul speed.
  """
  ones = jnp.ones((x.shape[0], 1, x.shape[1]), x.dtype)
  total = jax.lax.dot_general(ones, x, (((2,), (1,)), ((0,), (0,))),
                              preferred_element_type=jnp.float32)
  return total[:, 0].astype(x.dtype)


def sum_leading(x: Array) -> Array:
  """Sum over axis 0, keeping it with size 1, as a matmul (see `_sum_middle`)."""
  ones = jnp.ones((1, x.shape[0]), x.dtype)
  total = jax.lax.dot_general(ones, x, (((1,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
  return total.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def toeplitz(values: Array, query_length: int, key_length: int) -> Array:
  """[h, q + k - 1] values of offsets -(q-1)..(k-1) -> [h, q, k] with [i, j] = offset j - i.

  Built from tile/reshape/slice only (no gather); the gradient sums the diagonals.
  """
  n = query_length + key_length
  u = jnp.concatenate([values, jnp.zeros(values.shape[:-1] + (1,), values.dtype)], -1)
  flat = jnp.tile(u, query_length)[..., :query_length * (n - 1)]
  rows = flat.reshape(values.shape[:-1] + (query_length, n - 1))
  return rows[..., query_length - 1:query_length - 1 + key_length]


def _toeplitz_fwd(values, query_length, key_length):
  return toeplitz(values, query_length, key_length), None


def _toeplitz_bwd(query_length, key_length, _, g):
  # Inverse of the forward's layout: row i of the padded [q, n - 1] grid starts at
  # offset -i, so flattening and re-reading it with row length n aligns the offsets.
  n = query_length + key_length
  rows = jnp.pad(g, ((0, 0), (0, 0), (query_length - 1, 0)))
  flat = jnp.pad(rows.reshape(g.shape[0], -1), ((0, 0), (0, query_length)))
  return (_sum_middle(flat.reshape(g.shape[0], query_length, n))[:, :n - 1],)


toeplitz.defvjp(_toeplitz_fwd, _toeplitz_bwd)


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


def _bdot(a: Array, b: Array, contract_a: int, contract_b: int) -> Array:
  """Matmul over the last two axes with the leading axes as batch, float32 result."""
  batch = tuple(range(a.ndim - 2))
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), (batch, batch)),
                             preferred_element_type=jnp.float32)


def _swap(x: Array) -> Array:
  return jnp.swapaxes(x, -1, -2)


def _attention_weights(query, key, bias, mask):
  """softmax(q k^T + bias) with masked scores at the float32 minimum (probs exactly 0).

  The mask is added rather than selected: XLA:CPU fuses an add into the score matmul and
  the softmax, while a select costs a pass of its own over [b, h, q, k]. Unmasked scores
  gain exactly 0; masked ones round to the minimum, whose exp underflows to 0.
  """
  scores = _bdot(query, key, 3, 3)  # [b, h, q, k]
  if bias is not None:
    scores = scores + bias.astype(jnp.float32)
  if mask is not None:
    scores = scores + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1)


@jax.custom_vjp
def dot_product_attention(query: Array, key: Array, value: Array, bias: Optional[Array],
                          mask: Optional[Array], keep: Optional[Array]) -> Array:
  """softmax(q k^T + bias, masked) v per head; q [b, h, q, d], k and v [b, h, k, d].

  bias: [1, h, q, k] float or None; mask: boolean, broadcastable to [b, h, q, k], or None;
  keep: dropout multipliers (0 or 1 / (1 - rate)) broadcastable to [b, h, q, k], or None.
  The gradient is written out so that every batched matmul is in the form XLA:CPU runs
  fast (contraction over the last axis of the left operand, no transposed [q, k] copies)
  and the bias gradient sums the batch with a matmul (see `sum_leading`). On the sgemm
  route without dropout, forward and backward are each one custom call (`_fused`).
  """
  if _fused(query, key, value, bias, mask, keep):
    return _fused_attention(query, key, value, bias, mask, with_probs=False)[0]
  return _attention_fwd(query, key, value, bias, mask, keep)[0]


def _blas_products(query, key, value) -> bool:
  """Whether the attention's [q, k]-by-[k, d] products go through `cpu_kernels`' sgemm:
  float32, whole query blocks (not decode steps' single rows)."""
  return (query.shape[2] >= 16 and query.dtype == key.dtype == value.dtype == jnp.float32
          and cpu_kernels.use_blas(math.prod(query.shape[:-1]), query, key))


def _heads_product(a, b, trans_a: bool = False):
  """op(a) [b, h, q, k] @ b [b, h, k, d] through the sgemm, b and the result passed
  [b, k, h, d] / [b, q, h, d]: the projections' layout, of which the caller's [b, h, *, d]
  arrays are transposes, so XLA cancels the swaps and the sgemm reads and writes in place
  (`cpu_kernels.blas_product`'s `interleaved`)."""
  swap = lambda x: jnp.swapaxes(x, 1, 2)
  return swap(cpu_kernels.blas_product(a, swap(b), trans_a=trans_a,
                                       interleaved=(False, True, True)))


def _fused(query, key, value, bias, mask, keep) -> bool:
  """Whether the attention runs as `cpu_kernels`' fused forward and backward: on the
  sgemm route, without dropout, the bias absent or [1, h, q, k] and the mask one for all
  heads."""
  _, h, q, k = query.shape[:3] + key.shape[2:3]
  return (_blas_products(query, key, value) and keep is None
          and (bias is None or bias.shape == (1, h, q, k))
          and (mask is None or (mask.ndim == 4 and mask.shape[1] == 1)))


def _fused_attention(query, key, value, bias, mask, with_probs: bool):
  """`cpu_kernels.attention_forward` on [b, h, l, d] arrays: (out, probs or None)."""
  b, _, q, _ = query.shape
  swap = lambda x: jnp.swapaxes(x, 1, 2)
  mask = None if mask is None else jnp.broadcast_to(mask[:, 0].astype(bool),
                                                    (b, q, key.shape[2]))
  bias = None if bias is None else bias[0].astype(jnp.float32)
  out, probs = cpu_kernels.attention_forward(swap(query), swap(key), swap(value), bias, mask,
                                             with_probs)
  return swap(out), probs


def _attention_fwd(query, key, value, bias, mask, keep):
  if _fused(query, key, value, bias, mask, keep):
    out, probs = _fused_attention(query, key, value, bias, mask, with_probs=True)
    return out, (query, key, value, bias, mask, keep, probs)
  probs = _attention_weights(query, key, bias, mask)
  weights = probs if keep is None else probs * keep
  if _blas_products(query, key, value):
    out = _heads_product(weights, value)
  else:
    out = _bdot(weights.astype(value.dtype), value, 3, 2).astype(value.dtype)
  return out, (query, key, value, bias, mask, keep, probs)


def _attention_bwd(residuals, d_out):
  query, key, value, bias, mask, keep, probs = residuals
  dtype = value.dtype
  weights = probs if keep is None else probs * keep
  blas = _blas_products(query, key, value)
  if _fused(query, key, value, bias, mask, keep):
    return _fused_attention_bwd(query, key, value, bias, mask, probs, d_out)
  if blas:  # weights^T d_out, transposed inside the sgemm
    d_value = _heads_product(weights, d_out, trans_a=True)
  else:  # dv^T = d_out^T weights: the transposes are of the small [*, length, d] operands.
    d_value = _swap(_bdot(_swap(d_out), weights.astype(dtype), 3, 2)).astype(dtype)
  # Masked scores get no gradient. Where a row sees some key, their probs are exactly 0
  # and so is d_scores = probs * (...); a row that sees none (a padding query) has
  # uniform probs, so its output gradient is zeroed before it reaches the scores. This
  # costs a [b, h, q, d_kv] multiply instead of a select over [b, h, q, k].
  d_out_rows = d_out
  if mask is not None:
    d_out_rows = d_out * jnp.any(mask, axis=-1, keepdims=True).astype(d_out.dtype)
  d_weights = _bdot(d_out_rows, value, 3, 3)  # [b, h, q, k]
  if keep is not None:
    d_weights = d_weights * keep
  d_scores = probs * (d_weights - jnp.sum(d_weights * probs, axis=-1, keepdims=True))
  d_scores_c = d_scores.astype(dtype)
  if blas:
    d_query = _heads_product(d_scores, key)
    d_key = _heads_product(d_scores, query, trans_a=True)
  else:
    d_query = _bdot(d_scores_c, key, 3, 2).astype(query.dtype)
    d_key = _swap(_bdot(_swap(query), d_scores_c, 3, 2)).astype(key.dtype)
  d_bias = None if bias is None else sum_leading(d_scores).astype(bias.dtype)
  return d_query, d_key, d_value, d_bias, None, None


def _fused_attention_bwd(query, key, value, bias, mask, probs, d_out):
  """`_attention_bwd` without dropout as one custom call (`cpu_kernels.attention_backward`):
  the [q, k] score gradients stay in cache head by head instead of 33 MB arrays (at
  `small`) written once and read four times."""
  rows = (jnp.ones(probs.shape[:3], jnp.float32) if mask is None else
          jnp.broadcast_to(jnp.any(mask, axis=-1), probs.shape[:3]).astype(jnp.float32))
  swap = lambda x: jnp.swapaxes(x, 1, 2)
  d_query, d_key, d_value, d_bias = cpu_kernels.attention_backward(
      probs, rows, swap(d_out.astype(jnp.float32)), swap(value), swap(query), swap(key))
  d_bias = None if bias is None else d_bias[None].astype(bias.dtype)
  return swap(d_query), swap(d_key), swap(d_value), d_bias, None, None


dot_product_attention.defvjp(_attention_fwd, _attention_bwd)


def xla_attention(query: Array, key: Array, value: Array, bias: Optional[Array],
                  mask: Optional[Array], keep: Optional[Array]) -> Array:
  """`dot_product_attention` in plain jnp (masked scores selected away), autodiff gradient."""
  scores = jnp.einsum("bhqd,bhkd->bhqk", query, key, preferred_element_type=jnp.float32)
  if bias is not None:
    scores = scores + bias.astype(jnp.float32)
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1)
  if keep is not None:
    weights = weights * keep
  return jnp.einsum("bhqk,bhkd->bhqd", weights.astype(value.dtype), value,
                    preferred_element_type=jnp.float32).astype(value.dtype)


def cudnn_attention(query: Array, key: Array, value: Array, bias: Optional[Array],
                    mask: Optional[Array]) -> Array:
  """`dot_product_attention` (no dropout) by `jax.nn.dot_product_attention` on cuDNN.

  Its layout is [batch, length, heads, d]; T5 does not scale the scores (scale 1).
  """
  to_bthd = lambda x: jnp.swapaxes(x, 1, 2)
  out = jax.nn.dot_product_attention(
      to_bthd(query), to_bthd(key), to_bthd(value.astype(query.dtype)),
      bias=None if bias is None else bias.astype(query.dtype), mask=mask, scale=1.0,
      implementation="cudnn")
  return to_bthd(out).astype(value.dtype)


CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_unsupported_reason(query: Array, key: Array, bias: Optional[Array],
                             keep: Optional[Array]) -> Optional[str]:
  """Why cuDNN attention cannot run these inputs here, or None when it can.

  The conditions are those jax 0.10's cuDNN path checks for bfloat16/float16 flash
  attention (head dim up to 128 before Hopper; even lengths with a bias in training).
  """
  backend = jax.default_backend()
  if backend != "gpu":
    return f"it needs a GPU and the default backend is {backend!r}"
  if query.dtype not in CUDNN_DTYPES:
    return f"it takes bfloat16 or float16, not {query.dtype}"
  if query.shape[-1] > 128 or query.shape[-1] % 8:
    return f"head dim (d_kv) {query.shape[-1]} is not a multiple of 8 up to 128"
  if keep is not None:
    return "it takes no dropout mask (dropout_rate > 0 in training)"
  if bias is not None and (query.shape[2] % 2 or key.shape[2] % 2):
    return (f"with a position bias its lengths must be even, got query {query.shape[2]} "
            f"and key {key.shape[2]}")
  return None


def resolve_attention_impl(impl: str, query: Array, key: Array, bias: Optional[Array],
                           keep: Optional[Array]) -> str:
  """The implementation `attention` runs for `impl` (see `T5Config.attention_impl`).

  'auto': 'custom' on CPU; on GPU 'cudnn' where `cudnn_unsupported_reason` is None,
  else 'xla'; 'xla' on other backends. 'cudnn' where it cannot run is a ValueError.
  """
  if impl not in ATTENTION_IMPLS:  # T5Config checks its own; this is for direct callers
    raise ValueError(f"unknown attention_impl {impl!r}; choose from {list(ATTENTION_IMPLS)}")
  reason = (cudnn_unsupported_reason(query, key, bias, keep) if impl in ("auto", "cudnn")
            else None)
  if impl == "cudnn" and reason:
    raise ValueError(f"attention_impl='cudnn' cannot run here: {reason}; "
                     f"use 'auto', 'custom' or 'xla'")
  if impl != "auto":
    return impl
  if jax.default_backend() == "cpu":
    return "custom"
  return "xla" if reason else "cudnn"


def attention(impl: str, query: Array, key: Array, value: Array, bias: Optional[Array],
              mask: Optional[Array], keep: Optional[Array]) -> Array:
  """`dot_product_attention`'s contract, computed by the implementation `impl` picks."""
  impl = resolve_attention_impl(impl, query, key, bias, keep)
  if impl == "custom":
    return dot_product_attention(query, key, value, bias, mask, keep)
  if impl == "xla":
    return xla_attention(query, key, value, bias, mask, keep)
  return cudnn_attention(query, key, value, bias, mask)


class MultiHeadAttention(nn.Module):
  """T5 attention (no score scaling, no biases) with an optional t5x-style decode cache.

  Heads are laid out [batch, heads, length, d_kv] from the projections on, so the
  attention matmuls need no transposes of the [q, k] score arrays. In decode mode the
  first call (cache absent) records zero caches shaped like the full inputs; each later
  call takes one position, writes its key/value at `cache_index`, and attends to the
  cached positions <= that index. Cross-attention (`fixed_kv`: `inputs_kv` is the same
  encoder output at every step) projects it at every step, as t5x does, unless the call
  that created the cache had `store_kv`: then the cache holds the projected keys and
  values, and steps read them instead (they must pass the same encoder output).
  `out_in`: the projections' kernels are held [out, in] (`Dense`).
  """
  config: T5Config
  out_in: bool = False

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Optional[Array],
               bias: Optional[Array], deterministic: bool, decode: bool = False,
               fixed_kv: bool = False, store_kv: bool = False) -> Array:
    cfg = self.config
    inner = cfg.num_heads * cfg.d_kv
    proj = functools.partial(Dense, inner, ("embed", "joined_kv"), cfg, out_in=self.out_in)
    axes = ("batch", "heads", "length", "kv")
    split = lambda x: constrain(
        x.reshape(x.shape[:-1] + (cfg.num_heads, cfg.d_kv)).transpose(0, 2, 1, 3), axes)
    step = decode and self.has_variable("cache", "cached_key")
    fused = None
    if step and not fixed_kv:  # a self-attention decode step: one matmul for q, k and v
      fused = fused_projections(self, inputs_q, ("query", "key", "value"))
    if fused is not None:
      query, key, value = (split(y) for y in fused)
    else:
      # Fold 1/sqrt(d_kv) into the query init, as T5 does (scores are not scaled).
      query = split(proj(init_scale=1.0 / cfg.d_kv, name="query")(inputs_q))
      if step and fixed_kv:
        # Cross-attention step with keys and values stored when the cache was created.
        key = self.get_variable("cache", "cached_key")
        value = self.get_variable("cache", "cached_value")
      else:
        key = split(proj(name="key")(inputs_kv))
        value = split(proj(name="value")(inputs_kv))
    if decode and fixed_kv and store_kv and not self.has_variable("cache", "cached_key"):
      self.put_variable("cache", "cached_key", key.astype(cfg.dtype))
      self.put_variable("cache", "cached_value", value.astype(cfg.dtype))
    if decode and not fixed_kv:
      initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if initialized:
        if query.shape[2] != 1:
          raise ValueError(f"decode steps take one position, got length {query.shape[2]}")
        index = cache_index.value
        key = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype),
                                           (0, 0, index, 0))
        value = jax.lax.dynamic_update_slice(cached_value.value,
                                             value.astype(cached_value.value.dtype),
                                             (0, 0, index, 0))
        cached_key.value, cached_value.value = key, value
        cache_index.value = index + 1
        visible = (jnp.arange(key.shape[2]) <= index)[None, None, None, :]
        mask = visible if mask is None else jnp.logical_and(mask, visible)
        if bias is not None:  # keep only the row of the current position: [1, h, 1, k]
          if bias.shape[-1] != key.shape[2]:
            raise ValueError(f"decode step: the position bias covers {bias.shape[-1]} "
                             f"positions but the cache holds {key.shape[2]}; pass "
                             f"max_decode_length={key.shape[2]}")
          bias = jax.lax.dynamic_slice_in_dim(bias, index, 1, axis=2)

    keep = None
    if not deterministic and cfg.dropout_rate > 0.0:
      shape = query.shape[:2] + (query.shape[2], key.shape[2])
      kept = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - cfg.dropout_rate, shape)
      keep = kept.astype(jnp.float32) / (1.0 - cfg.dropout_rate)
    out = attention(cfg.attention_impl, query, key, value.astype(cfg.dtype), bias, mask,
                    keep)
    out = out.transpose(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], inner)
    out = Dense(cfg.d_model, ("joined_kv", "embed"), cfg, out_in=self.out_in, name="out")(out)
    return constrain(out, ("batch", "length", "embed"))


_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=True),  # HF 'gelu_new'
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


class MlpBlock(nn.Module):
  """T5 feed-forward: `wo(act(wi_0 x) * wi_1 x)` when gated, else `wo(act(wi x))`;
  `out_in` as in `Dense`."""
  config: T5Config
  out_in: bool = False

  @nn.compact
  def __call__(self, x: Array, deterministic: bool, fuse: bool = False) -> Array:
    """`fuse`: one matmul for `wi_0` and `wi_1` (decode steps; see `fused_projections`)."""
    cfg = self.config
    if cfg.activation not in _ACTIVATIONS:
      raise ValueError(f"unsupported feed_forward_proj {cfg.feed_forward_proj!r}")
    act = _ACTIVATIONS[cfg.activation]
    wi = functools.partial(Dense, cfg.d_ff, ("embed", "mlp"), cfg, out_in=self.out_in)
    fused = fused_projections(self, x, ("wi_0", "wi_1")) if fuse and cfg.is_gated else None
    if fused is not None:
      h = act(fused[0]) * fused[1]
    elif cfg.is_gated:
      h = act(wi(name="wi_0")(x)) * wi(name="wi_1")(x)
    else:
      h = act(wi(name="wi")(x))
    h = constrain(h, ("batch", "length", "mlp"))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return Dense(cfg.d_model, ("mlp", "embed"), cfg, out_in=self.out_in, name="wo")(h)
