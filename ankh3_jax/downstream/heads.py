"""Prediction heads on per-residue embeddings, as the Ankh papers evaluate them.

`ConvBertLayer` is a ConvBERT block (Jiang et al., 2020) written for this project: mixed
attention, where half of the heads are self-attention and half are span-based dynamic
convolutions (a per-position kernel generated from a depthwise-separable convolution of
the input and the query), then a feed-forward block; post-layer-norm, GELU.
Ankh's downstream setting: width = embedding size, feed-forward size = embedding / 2,
4 heads, 1 layer, kernel 7, dropout 0.2.

Heads: `ResidueClassifier` (SS3/SS8), `SequenceRegressor` (fitness, fluorescence; masked
mean pooling) and `ContactPredictor` (bilinear pair scores plus a learned
sequence-separation bias, symmetrised). Each takes `kind='convbert'` or `'linear'` (a
probe: no ConvBERT block). Inputs: features [B, L, D] and a validity mask [B, L].
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ankh3_jax.layers import relative_position_buckets

KINDS = ("convbert", "linear")
NEG = -1e9


class ConvBertLayer(nn.Module):
  """One ConvBERT block: mixed attention (self-attention + dynamic convolution) and FFN."""
  num_heads: int = 4
  intermediate_size: int = 0      # 0: width // 2 (Ankh's setting)
  kernel_size: int = 7
  dropout: float = 0.2
  head_ratio: int = 2             # 1 / fraction of heads that are self-attention

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    heads = max(1, self.num_heads // self.head_ratio)
    head_dim = width // self.num_heads
    inner = heads * head_dim
    k = self.kernel_size
    batch, length = x.shape[:2]
    drop = nn.Dropout(self.dropout)
    xm = x * mask[..., None]

    # Self-attention half.
    query = nn.Dense(inner, name="query")(xm)
    key = nn.Dense(inner, name="key")(xm)
    value = nn.Dense(inner, name="value")(xm)
    split = lambda t: t.reshape(batch, length, heads, head_dim)
    scores = jnp.einsum("bqhd,bkhd->bhqk", split(query), split(key)) / np.sqrt(head_dim)
    scores = jnp.where(mask[:, None, None, :] > 0, scores, NEG)
    weights = drop(jax.nn.softmax(scores, axis=-1), deterministic=deterministic)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, split(value)).reshape(
        batch, length, inner)

    # Span-based dynamic convolution half: kernel from (separable conv of x) * query.
    span = nn.Conv(width, (k,), feature_group_count=width, padding="SAME", use_bias=False,
                   name="span_depthwise")(xm)
    span = nn.Dense(inner, name="span_pointwise")(span)
    kernel = nn.Dense(heads * k, name="conv_kernel")(span * query)
    kernel = jax.nn.softmax(kernel.reshape(batch, length, heads, k), axis=-1)
    conv_value = nn.Dense(inner, name="conv_value")(xm) * mask[..., None]
    padded = jnp.pad(conv_value, ((0, 0), (k // 2, k - 1 - k // 2), (0, 0)))
    windows = jnp.stack([padded[:, j:j + length] for j in range(k)], axis=2)  # [B, L, k, I]
    windows = windows.reshape(batch, length, k, heads, head_dim)
    convolved = jnp.einsum("blhk,blkhd->blhd", kernel, windows).reshape(batch, length, inner)

    mixed = jnp.concatenate([attended, convolved], axis=-1)
    h = drop(nn.Dense(width, name="attention_out")(mixed), deterministic=deterministic)
    x = nn.LayerNorm(name="attention_norm")(x + h)
    h = nn.gelu(nn.Dense(self.intermediate_size or max(1, width // 2), name="ffn_in")(x))
    h = drop(nn.Dense(width, name="ffn_out")(h), deterministic=deterministic)
    return nn.LayerNorm(name="ffn_norm")(x + h) * mask[..., None]


class _Trunk(nn.Module):
  """ConvBERT block(s), or nothing for a linear probe."""
  kind: str = "convbert"
  num_layers: int = 1
  num_heads: int = 4
  kernel_size: int = 7
  dropout: float = 0.2

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    if self.kind not in KINDS:
      raise ValueError(f"unknown head kind {self.kind!r}; choose from {KINDS}")
    x = x.astype(jnp.float32)
    if self.kind == "linear":
      return x
    width = x.shape[-1]
    if width % self.num_heads:  # project up to a width the heads divide
      width = -(-width // self.num_heads) * self.num_heads
      x = nn.Dense(width, name="input_projection")(x)
    for i in range(self.num_layers):
      x = ConvBertLayer(self.num_heads, kernel_size=self.kernel_size, dropout=self.dropout,
                        name=f"convbert_{i}")(x, mask, deterministic)
    return x


class ResidueClassifier(nn.Module):
  """Per-residue logits [B, L, num_classes]."""
  num_classes: int
  kind: str = "convbert"
  dropout: float = 0.2

  @nn.compact
  def __call__(self, features, mask, deterministic: bool = True):
    h = _Trunk(self.kind, dropout=self.dropout, name="trunk")(features, mask, deterministic)
    return nn.Dense(self.num_classes, name="classifier")(h)


class SequenceRegressor(nn.Module):
  """One value per sequence [B] from the masked mean of the (ConvBERT) features."""
  kind: str = "convbert"
  dropout: float = 0.2

  @nn.compact
  def __call__(self, features, mask, deterministic: bool = True):
    h = _Trunk(self.kind, dropout=self.dropout, name="trunk")(features, mask, deterministic)
    pooled = jnp.sum(h * mask[..., None], axis=1) / jnp.maximum(
        jnp.sum(mask, axis=1, keepdims=True), 1.0)
    return nn.Dense(1, name="regressor")(pooled)[:, 0]


class ContactPredictor(nn.Module):
  """Symmetric contact logits [B, L, L]: bilinear pair score + separation bias."""
  kind: str = "convbert"
  dropout: float = 0.2
  pair_dim: int = 64
  num_buckets: int = 32
  max_distance: int = 128

  @nn.compact
  def __call__(self, features, mask, deterministic: bool = True):
    h = _Trunk(self.kind, dropout=self.dropout, name="trunk")(features, mask, deterministic)
    left = nn.Dense(self.pair_dim, name="left")(h)
    right = nn.Dense(self.pair_dim, name="right")(h)
    logits = jnp.einsum("bic,bjc->bij", left, right) / np.sqrt(self.pair_dim)
    length = features.shape[1]
    buckets = relative_position_buckets(length, length, False, self.num_buckets,
                                        self.max_distance)
    buckets = np.maximum(buckets, buckets.T)  # |i - j| bucket
    table = self.param("separation_bias", nn.initializers.zeros, (self.num_buckets,))
    logits = logits + table[jnp.asarray(buckets)][None]
    return 0.5 * (logits + jnp.swapaxes(logits, 1, 2))
