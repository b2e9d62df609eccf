"""Decoder kernels held [out, in] for inference (`T5Config.decoder_kernels`, set by
`inference.resolve_model` where decode steps stream their weights): the same tokens and
probabilities as the stored [in, out] layout, the fast product form kept in the compiled
decode loop, and checkpoints still written [in, out]."""
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from ankh3_jax import complete
from ankh3_jax import config as config_lib
from ankh3_jax import decoding
from ankh3_jax import inference
from ankh3_jax import layers
from ankh3_jax import model as model_lib
from ankh3_jax import model_io

PROMPTS = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "MVLSPADKTNVKAAWGKV", "GSHMKK"]
WI_0 = ("decoder", "layers_0", "mlp", "wi_0", "kernel")


def leaf(params, path=WI_0):
  for key in path:
    params = params[key]
  return params


@pytest.fixture(scope="module")
def tiny():
  config = config_lib.preset("tiny")
  return config, jax.tree.map(np.asarray, nn.unbox(model_lib.init_params(config, seed=3)))


@pytest.fixture
def swapped(tiny, monkeypatch):
  monkeypatch.setattr(layers, "FUSED_COPY_LIMIT_BYTES", 0)  # `tiny` counts as large here
  return inference.resolve_model(tiny)


def test_layout_follows_the_decoder_size(tiny):
  assert inference.decoder_kernel_layout(config_lib.preset("small")) == "in_out"
  for name in ("ankh_base", "ankh3_large"):
    assert inference.decoder_kernel_layout(config_lib.preset(name)) == "out_in"
  assert inference.resolve_model(tiny).config.decoder_kernels == "in_out"
  with pytest.raises(ValueError, match="decoder_kernels"):
    config_lib.preset("tiny", decoder_kernels="column_major")
  assert "decoder_kernels" not in config_lib.config_to_dict(tiny[0])  # files unchanged


def test_swapped_kernels(tiny, swapped):
  assert swapped.config.decoder_kernels == "out_in"
  kernel = leaf(swapped.params)
  np.testing.assert_array_equal(kernel, leaf(tiny[1]).T)
  assert kernel.ctypes.data % inference.CPU_ALIGNMENT == 0  # placed without a copy
  out_kernel = ("decoder", "layers_0", "encoder_decoder_attention", "out", "kernel")
  np.testing.assert_array_equal(leaf(swapped.params, out_kernel), leaf(tiny[1], out_kernel).T)
  logits = ("decoder", "logits_dense", "kernel")  # the output layer stays [in, out]
  assert leaf(swapped.params, logits) is leaf(tiny[1], logits)
  assert leaf(tiny[1]).shape == (64, 128)  # the caller's tree untouched
  again = inference.resolve_model(swapped)
  assert leaf(again.params) is kernel  # laid out once


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_same_completions_and_scores(tiny, swapped, strategy):
  plain = inference.resolve_model(tiny)
  a, b = (complete.complete(m, PROMPTS, max_new_tokens=12, strategy=strategy, num_beams=3,
                            batch_size=4) for m in (plain, swapped))
  assert [x.token_ids for x in a] == [x.token_ids for x in b]
  np.testing.assert_allclose([x.log_prob for x in b], [x.log_prob for x in a],
                             rtol=1e-5, atol=1e-5)
  tokens = [x.token_ids for x in a]
  for p, q in zip(complete.token_log_probs(plain, PROMPTS, tokens),
                  complete.token_log_probs(swapped, PROMPTS, tokens)):
    np.testing.assert_allclose(q, p, rtol=1e-5, atol=1e-5)


def test_decode_loop_multiplies_kernel_by_rows(swapped):
  """[out, rows] = kernel @ rows^T: XLA folds the transpose back into a [rows, out]
  product (the slow form) unless `layers.Dense` stops it."""
  config = swapped.config
  fn = decoding.compiled_generate(config, decoding.DecodeOptions("greedy", 4, 1))
  knobs = {"allowed": np.ones(config.vocab_size, bool), "temperature": np.float32(1),
           "top_k": np.int32(0), "top_p": np.float32(1), "length_penalty": np.float32(1),
           "rng": jax.random.PRNGKey(0)}
  tokens = np.full((2, 16), 5, np.int32)
  with inference.matmul_precision("float32"):
    text = fn.lower(swapped.params, tokens, knobs).compile().as_text()
  assert re.search(rf"f32\[{config.d_ff},2\]\{{1,0\}} dot\(", text)
  assert not re.search(rf"f32\[2,{config.d_ff}\]\{{1,0\}} dot\(", text)


def test_saved_as_checkpoints_store(tiny, swapped, tmp_path):
  model_io.save_model(str(tmp_path / "m"), swapped.config, swapped.params)
  config, params, _ = model_io.load_model(str(tmp_path / "m"))
  assert config.decoder_kernels == "in_out"
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(tiny[1])):
    np.testing.assert_array_equal(a, b)
