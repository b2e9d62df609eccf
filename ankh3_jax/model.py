"""The Ankh3 encoder-decoder in Flax linen, with t5x's module contract.

`Transformer.__call__`, `.encode` and `.decode` take the arguments t5x's
`EncoderDecoderModel` passes, so this module plugs into t5x as well as into our trainer.
Packing is supported through segment ids; relative positions come from the static
layout (positions are contiguous inside a packed segment, and attention across segments
is masked), so `*_positions` are accepted for the contract and otherwise unused.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ankh3_jax import layers
from ankh3_jax.config import T5Config

Array = jax.Array
constrain = nn.with_logical_constraint

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def attention_mask(query_valid: Array, key_valid: Array,
                   query_segments: Optional[Array] = None,
                   key_segments: Optional[Array] = None) -> Array:
  """[batch, 1, q, k] boolean mask from validity (and packing segment) vectors."""
  mask = query_valid[:, None, :, None] & key_valid[:, None, None, :]
  if query_segments is not None and key_segments is not None:
    mask &= query_segments[:, None, :, None] == key_segments[:, None, None, :]
  return mask


def causal_mask(length: int) -> Array:
  return jnp.tril(jnp.ones((length, length), bool))[None, None]


class EncoderLayer(nn.Module):
  config: T5Config
  scanned: bool = False

  @nn.compact
  def __call__(self, x, mask, bias, deterministic):
    cfg = self.config
    dropout = nn.Dropout(cfg.dropout_rate)
    h = layers.RMSNorm(cfg, name="pre_attention_layer_norm")(x)
    h = layers.MultiHeadAttention(cfg, name="attention")(h, h, mask, bias, deterministic)
    x = x + dropout(h, deterministic=deterministic)
    h = layers.RMSNorm(cfg, name="pre_mlp_layer_norm")(x)
    h = layers.MlpBlock(cfg, name="mlp")(h, deterministic)
    x = constrain(x + dropout(h, deterministic=deterministic), ("batch", "length", "embed"))
    return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
  config: T5Config
  scanned: bool = False

  @nn.compact
  def __call__(self, x, encoded, self_mask, cross_mask, bias, deterministic, decode,
               cache_encoder_kv=False):
    cfg = self.config
    out_in = cfg.decoder_kernels == "out_in"
    dropout = nn.Dropout(cfg.dropout_rate)
    h = layers.RMSNorm(cfg, name="pre_self_attention_layer_norm")(x)
    h = layers.MultiHeadAttention(cfg, out_in, name="self_attention")(
        h, h, self_mask, bias, deterministic, decode)
    x = x + dropout(h, deterministic=deterministic)
    h = layers.RMSNorm(cfg, name="pre_cross_attention_layer_norm")(x)
    h = layers.MultiHeadAttention(cfg, out_in, name="encoder_decoder_attention")(
        h, encoded, cross_mask, None, deterministic, decode, fixed_kv=True,
        store_kv=cache_encoder_kv)
    x = x + dropout(h, deterministic=deterministic)
    h = layers.RMSNorm(cfg, name="pre_mlp_layer_norm")(x)
    h = layers.MlpBlock(cfg, out_in, name="mlp")(h, deterministic,
                                                 fuse=decode and x.shape[1] == 1)
    x = constrain(x + dropout(h, deterministic=deterministic), ("batch", "length", "embed"))
    return (x, None) if self.scanned else x


def _stack(layer_cls, cfg: T5Config, num_layers: int, static_argnums: tuple[int, ...],
           num_broadcast: int):
  """Wraps a layer class with remat and/or scan as configured; returns a constructor."""
  if cfg.remat_policy != "none":
    if cfg.remat_policy not in _REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {cfg.remat_policy!r}")
    layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[cfg.remat_policy],
                         prevent_cse=not cfg.scan_layers, static_argnums=static_argnums)
  if not cfg.scan_layers:
    return lambda name: layer_cls(cfg, name=name)
  scanned = nn.scan(
      layer_cls,
      variable_axes={"params": 0, "cache": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * num_broadcast,
      length=num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )
  return lambda name: scanned(cfg, scanned=True, name=name)


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, tokens, segment_ids=None, *, deterministic: bool):
    cfg = self.config
    x = self.shared_embedding(tokens.astype(jnp.int32)).astype(cfg.dtype)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = constrain(x, ("batch", "length", "embed"))
    length = tokens.shape[-1]
    bias = layers.RelativePositionBias(cfg, bidirectional=True, name="relpos_bias")(
        length, length)
    mask = attention_mask(tokens > 0, tokens > 0, segment_ids, segment_ids)
    make = _stack(EncoderLayer, cfg, cfg.num_encoder_layers, static_argnums=(4,),
                  num_broadcast=3)
    if cfg.scan_layers:
      x, _ = make("layers")(x, mask, bias, deterministic)
    else:
      for i in range(cfg.num_encoder_layers):
        x = make(f"layers_{i}")(x, mask, bias, deterministic)
    x = layers.RMSNorm(cfg, name="encoder_norm")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded, decoder_input_tokens, self_mask, cross_mask, *,
               deterministic: bool, decode: bool, max_decode_length: Optional[int] = None,
               cache_encoder_kv: bool = False):
    cfg = self.config
    x = self.shared_embedding(decoder_input_tokens.astype(jnp.int32)).astype(cfg.dtype)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = constrain(x, ("batch", "length", "embed"))
    length = max_decode_length if decode and max_decode_length else x.shape[1]
    bias = layers.RelativePositionBias(cfg, bidirectional=False, name="relpos_bias")(
        length, length)
    make = _stack(DecoderLayer, cfg, cfg.num_decoder_layers, static_argnums=(6, 7, 8),
                  num_broadcast=7)
    args = (encoded, self_mask, cross_mask, bias, deterministic, decode, cache_encoder_kv)
    if cfg.scan_layers:
      x, _ = make("layers")(x, *args)
    else:
      for i in range(cfg.num_decoder_layers):
        x = make(f"layers_{i}")(x, *args)
    x = layers.RMSNorm(cfg, name="decoder_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    if cfg.tie_word_embeddings:
      logits = self.shared_embedding.attend((x * cfg.d_model ** -0.5).astype(cfg.dtype))
    else:
      logits = layers.Dense(cfg.vocab_size, ("embed", "vocab"), cfg, name="logits_dense")(x)
    return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class Transformer(nn.Module):
  """Ankh3 / T5 encoder-decoder. Parameter tree as t5x's minimal T5:
  `token_embedder`, `encoder/{relpos_bias,layers_i,encoder_norm}`,
  `decoder/{relpos_bias,layers_i,decoder_norm,logits_dense}` (`layers` when scanned).
  """
  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                    ("vocab", "embed")),
        name="token_embedder")
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None,
             *, enable_dropout: bool = True):
    """[batch, length] token ids -> [batch, length, d_model] encoder outputs."""
    del encoder_positions  # relative positions come from the static layout
    return self.encoder(encoder_input_tokens, encoder_segment_ids,
                        deterministic=not enable_dropout)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
             encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None, *,
             enable_dropout: bool = True, decode: bool = False,
             max_decode_length: Optional[int] = None, cache_encoder_kv: bool = False):
    """Decoder logits [batch, length, vocab]; with `decode=True`, one cached step.

    `cache_encoder_kv=True` on the decode call that creates the cache also stores the
    cross-attention keys and values of `encoded`, so that steps read them instead of
    projecting `encoded` again (each step must then pass that same `encoded`). Without
    it, as in t5x, the cache may be created from dummy inputs.
    """
    del decoder_positions
    if decode:
      # One step at a time: causality comes from the cache index in the attention layer.
      self_mask = None
      cross_mask = attention_mask(jnp.ones_like(decoder_input_tokens, bool),
                                  encoder_input_tokens > 0)
    else:
      target_valid = decoder_target_tokens > 0
      self_mask = attention_mask(target_valid, target_valid, decoder_segment_ids,
                                 decoder_segment_ids) & causal_mask(decoder_input_tokens.shape[1])
      cross_mask = attention_mask(target_valid, encoder_input_tokens > 0,
                                  decoder_segment_ids, encoder_segment_ids)
    return self.decoder(encoded, decoder_input_tokens, self_mask, cross_mask,
                        deterministic=not enable_dropout, decode=decode,
                        max_decode_length=max_decode_length,
                        cache_encoder_kv=cache_encoder_kv)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
               encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
               decoder_positions=None, *, enable_dropout: bool = True, decode: bool = False,
               max_decode_length: Optional[int] = None):
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       decoder_positions, enable_dropout=enable_dropout, decode=decode,
                       max_decode_length=max_decode_length)


  def encoder_token_logits(self, encoded):
    """[batch, length, vocab] logits of encoder outputs through the transposed token
    embedding: the parameter-free head of the optional encoder-side MLM loss
    (`LossConfig.encoder_mlm_weight`). Exports and conversions are unaffected."""
    cfg = self.config
    logits = self.token_embedder.attend((encoded * cfg.d_model ** -0.5).astype(cfg.dtype))
    return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  def with_encoder_logits(self, encoder_input_tokens, decoder_input_tokens,
                          decoder_target_tokens, encoder_segment_ids=None,
                          decoder_segment_ids=None, encoder_positions=None,
                          decoder_positions=None, *, enable_dropout: bool = True):
    """(decoder logits as `__call__`, `encoder_token_logits`) from one encoder pass."""
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          enable_dropout=enable_dropout)
    logits = self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                         decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                         decoder_positions, enable_dropout=enable_dropout)
    return logits, self.encoder_token_logits(encoded)


def _init(config: T5Config, tokens, seed: int = 0):
  return Transformer(config).init(jax.random.key(seed), tokens, tokens, tokens,
                                  enable_dropout=False)


def init_params(config: T5Config, seed: int = 0):
  """Randomly initialised parameters of `Transformer(config)` (logically boxed, as
  `Transformer.init` returns them): a random-init model for tests and baselines."""
  return _init(config, jnp.ones((1, 8), jnp.int32), seed)["params"]


def abstract_params(config: T5Config):
  """Unboxed shape/dtype tree of the parameters of `Transformer(config)`; nothing allocated."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return nn.unbox(jax.eval_shape(lambda t: _init(config, t), tokens)["params"])
