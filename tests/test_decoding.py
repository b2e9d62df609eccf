"""The decode loop's pieces: logit filters, segments, cache growth (no model needed)."""
import numpy as np

from ankh3_jax import decoding


def test_filter_logits():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  kept = lambda out: (np.asarray(out) > -1e8).tolist()[0]
  assert kept(decoding.filter_logits(logits, 1.0, 2, 1.0)) == [True, True, False, False]
  assert kept(decoding.filter_logits(logits, 1.0, 0, 0.7)) == [True, True, False, False]
  assert kept(decoding.filter_logits(logits, 1.0, 0, 0.81)) == [True, True, True, False]
  assert kept(decoding.filter_logits(logits, 1.0, 0, 0.1)) == [True, False, False, False]


def test_decode_segments_and_cache_growth():
  assert decoding.decode_segments(256) == [16, 24, 32, 48, 64, 96, 128, 192, 256]
  assert decoding.decode_segments(20) == [16, 20]
  assert decoding.decode_segments(1) == [1]
  cache = {"decoder": {
      "layers_0": {"self_attention": {"cached_key": np.ones((2, 4, 16, 8)),
                                      "cache_index": np.array(5)},
                   "encoder_decoder_attention": {"cached_key": np.ones((2, 4, 11, 8))}},
      "layers": {"self_attention": {"cached_value": np.ones((3, 2, 4, 16, 8))}}}}
  grown = decoding.grow_cache(cache, 24)
  layer = grown["decoder"]["layers_0"]
  assert layer["self_attention"]["cached_key"].shape == (2, 4, 24, 8)
  assert float(layer["self_attention"]["cached_key"][:, :, 16:].sum()) == 0.0
  assert int(layer["self_attention"]["cache_index"]) == 5
  assert layer["encoder_decoder_attention"]["cached_key"].shape == (2, 4, 11, 8)
  assert grown["decoder"]["layers"]["self_attention"]["cached_value"].shape == (3, 2, 4, 24, 8)
