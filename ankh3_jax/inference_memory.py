"""Memory the inference commands are about to ask for, checked before they ask.

The estimates count the arrays that grow with the request (one layer's attention scores
and activations, the decoder's key/value cache), in float32, not the weights: a rough
lower bound of the peak, meant to turn an allocation that cannot succeed into a message.
"""
import os

from ankh3_jax.config import T5Config

_F32 = 4


def available_bytes() -> int:
  """Memory a computation may use: the accelerator's limit, else the machine's RAM."""
  import jax  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
      return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def encoder_batch_bytes(config: T5Config, rows: int, length: int) -> int:
  """Peak activations of one encoder pass over [rows, length] tokens (one layer's worth
  of scores and feed-forward, plus the hidden states kept for the output)."""
  inner = config.num_heads * config.d_kv
  scores = 2 * rows * config.num_heads * length * length         # logits and weights
  per_token = 4 * config.d_model + 3 * inner + 2 * config.d_ff    # hidden, q/k/v, mlp
  return _F32 * (scores + rows * length * per_token)


def decode_bytes(config: T5Config, rows: int, steps: int) -> int:
  """The decoder's self-attention cache and token buffers for `rows` x `steps` tokens."""
  inner = config.num_heads * config.d_kv
  cache = 2 * config.num_decoder_layers * rows * steps * inner    # keys and values
  buffers = 8 * rows * steps                                      # tokens, beams' copies
  return _F32 * (cache + buffers)


def params_bytes(params) -> int:
  """Bytes of a parameter tree (arrays or shape/dtype structs) as stored."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(params))


def gigabytes(num_bytes: int) -> str:
  return f"{num_bytes / 2 ** 30:,.1f} GiB"
