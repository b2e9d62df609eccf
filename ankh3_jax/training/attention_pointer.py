"""Does the decoder find the masked position? Cross-attention on each sentinel's input slot.

In the MLM objective every masked residue becomes its own sentinel in the input, and the
decoder, reading sentinel k, must output the residue that sentinel k replaced. To use the
residue's context it must first find where sentinel k sits in the input: a pointer
learnt through cross-attention. An encoder-only MLM head needs no such step. The
measure here tells whether, and when, a model has learnt that pointer.
"""
import jax
import jax.numpy as jnp

from ankh3_jax import vocab as vocab_lib


def make_pointer_step(model):
  """Jitted `(params, batch) -> (mass, count, uniform)`: the pointer diagnostic of MLM batches.

  At every decoder position whose input is sentinel k (it must output sentinel k's
  residue), the cross-attention weight on the encoder position that holds sentinel k,
  best head of the best layer, summed over positions; `count` positions; `uniform` the
  sum of 1 / (input length), what uniform attention would score. A decoder that has
  learnt to find the masked position scores near 1.
  """
  def is_cross(module, name):
    return name == "__call__" and module.name in ("query", "key") and (
        "encoder_decoder_attention" in module.scope.path)

  def pointer(params, batch):
    _, state = model.apply({"params": params}, batch["encoder_input_tokens"],
                           batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                           enable_dropout=False, capture_intermediates=is_cross,
                           mutable=["intermediates"])
    num_heads, d_kv = model.config.num_heads, model.config.d_kv
    layers = state["intermediates"]["decoder"]
    enc, dec = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    first_sentinel = model.config.vocab_size - vocab_lib.NUM_SENTINELS
    target = (dec[:, :, None] == enc[:, None, :]) & (dec[:, :, None] >= first_sentinel)
    valid = jnp.any(target, -1)
    key_valid = (enc > 0)[:, None, None, :]
    best = jnp.zeros(dec.shape)
    for name in sorted(layers):
      cross = layers[name]["encoder_decoder_attention"]
      split = lambda x: x.reshape(x.shape[:2] + (num_heads, d_kv)).transpose(0, 2, 1, 3)
      q = split(cross["query"]["__call__"][0]).astype(jnp.float32)
      k = split(cross["key"]["__call__"][0]).astype(jnp.float32)
      scores = jnp.where(key_valid, jnp.einsum("bhqd,bhkd->bhqk", q, k), -1e9)
      weights = jax.nn.softmax(scores, -1)
      on_target = jnp.sum(weights * target[:, None], -1)  # [b, h, q]
      best = jnp.maximum(best, on_target.max(1))
    uniform = valid / jnp.sum(enc > 0, -1, keepdims=True)
    return jnp.sum(best * valid), jnp.sum(valid), jnp.sum(uniform)

  return jax.jit(pointer)


def pointer_attention(pointer_step, params, batches) -> dict:
  """{pointer_attention, pointer_uniform, positions} over MLM `batches`."""
  mass = count = uniform = 0.0
  for batch in batches:
    m, c, u = pointer_step(params, batch)
    mass, count, uniform = mass + float(m), count + float(c), uniform + float(u)
  if not count:
    return {}
  return {"pointer_attention": mass / count, "pointer_uniform": uniform / count,
          "positions": count}
