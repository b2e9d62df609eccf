"""`T5Config.attention_impl`: the implementations agree on CPU; per-backend choice."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ankh3_jax import config as config_lib
from ankh3_jax import layers
from ankh3_jax import model as model_lib
from test_attention import B, H, K, Q, attention_inputs  # pylint: disable=import-error

D = 8  # head size (cuDNN wants a multiple of 8)


def _inputs(seed=0):
  return attention_inputs(seed, head_dim=D)


def test_custom_and_xla_agree_in_outputs_and_gradients():
  q, k, v, bias, mask, keep = _inputs()
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(B, H, Q, D)), jnp.float32)
  for dropout in (None, keep):
    outs, grads = {}, {}
    for impl in ("custom", "xla"):
      fn = lambda *a, impl=impl: layers.attention(impl, *a, mask, dropout)
      outs[impl], vjp = jax.vjp(fn, q, k, v, bias)
      grads[impl] = vjp(cotangent)
    np.testing.assert_allclose(outs["xla"], outs["custom"], rtol=1e-6, atol=1e-6)
    for name, x, c in zip(("query", "key", "value", "bias"), grads["xla"], grads["custom"]):
      np.testing.assert_allclose(x, c, rtol=1e-5, atol=1e-5, err_msg=name)


def _tiny_loss_and_grads(impl: str):
  cfg = config_lib.preset("tiny", attention_impl=impl, num_encoder_layers=1,
                          num_decoder_layers=1)
  enc = jnp.array([[3, 5, 6, 7, 8, 1, 0, 0], [3, 9, 10, 1, 0, 0, 0, 0]])
  tgt = jnp.array([[5, 6, 7, 1, 0, 0], [9, 10, 11, 12, 1, 0]])
  dec_in = jnp.pad(tgt[:, :-1], ((0, 0), (1, 0)))
  m = model_lib.Transformer(cfg)
  params = nn.unbox(jax.jit(m.init)(jax.random.key(0), enc, dec_in, tgt)["params"])

  def loss(p):
    logits = m.apply({"params": p}, enc, dec_in, tgt, enable_dropout=False)
    ll = jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], -1)[..., 0]
    return -jnp.sum(ll * (tgt > 0)) / jnp.sum(tgt > 0)

  return jax.jit(jax.value_and_grad(loss))(params)


def test_tiny_model_same_loss_and_gradients_with_custom_and_xla():
  (custom_loss, custom_grads), (xla_loss, xla_grads) = (
      _tiny_loss_and_grads(impl) for impl in ("custom", "xla"))
  np.testing.assert_allclose(xla_loss, custom_loss, rtol=1e-6)
  flat_custom = jax.tree_util.tree_leaves_with_path(custom_grads)
  assert len(flat_custom) == len(jax.tree.leaves(xla_grads))
  for (path, c), x in zip(flat_custom, jax.tree.leaves(xla_grads)):
    np.testing.assert_allclose(x, c, rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_auto_is_custom_on_cpu_and_bit_identical():
  q, k, v, bias, mask, _ = _inputs()
  assert jax.default_backend() == "cpu"  # the tests run on the CPU
  assert layers.resolve_attention_impl("auto", q, k, bias, None) == "custom"
  np.testing.assert_array_equal(layers.attention("auto", q, k, v, bias, mask, None),
                                layers.dot_product_attention(q, k, v, bias, mask, None))
  assert config_lib.T5Config().attention_impl == "auto"


def test_cudnn_on_cpu_is_a_clear_error():
  q, k, v, bias, mask, _ = _inputs()
  with pytest.raises(ValueError, match="attention_impl='cudnn' cannot run here: "
                     "it needs a GPU and the default backend is 'cpu'"):
    layers.attention("cudnn", q, k, v, bias, mask, None)


def test_unknown_impl_is_an_error():
  with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
    config_lib.preset("tiny", attention_impl="flash")
  with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
    config_lib.config_from_dict({"attention_impl": "flash"})


def test_config_round_trip_and_older_dicts_mean_auto():
  cfg = config_lib.preset("tiny", attention_impl="xla")
  values = config_lib.config_to_dict(cfg)
  assert values["attention_impl"] == "xla"
  assert config_lib.config_from_dict(values) == cfg
  del values["attention_impl"]  # a model dir written before the switch existed
  assert config_lib.config_from_dict(values) == dataclasses.replace(cfg, attention_impl="auto")
  # The default is not written: files, run settings and fingerprints stay as before.
  default = config_lib.preset("tiny")
  assert "attention_impl" not in config_lib.config_to_dict(default)
  assert config_lib.config_from_dict(config_lib.config_to_dict(default)) == default


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_agrees_with_xla_on_gpu():
  q, k, v, bias, mask, _ = (x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x
                            for x in _inputs())
  q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, x.shape[2] % 2), (0, 0))) for x in (q, k, v))
  bias = jnp.pad(bias, ((0, 0), (0, 0), (0, Q % 2), (0, K % 2)))
  mask = jnp.pad(mask, ((0, 0), (0, 0), (0, Q % 2), (0, K % 2)))  # even lengths
  assert layers.resolve_attention_impl("auto", q, k, bias, None) == "cudnn"
  cotangent = jnp.ones(q.shape, jnp.bfloat16)
  results = {}
  for impl in ("cudnn", "xla"):
    out, vjp = jax.vjp(lambda *a, impl=impl: layers.attention(impl, *a, mask, None),
                       q, k, v, bias)
    results[impl] = (out, *vjp(cotangent))
  for name, c, x in zip(("out", "query", "key", "value", "bias"), results["cudnn"],
                        results["xla"]):
    np.testing.assert_allclose(np.asarray(c, np.float32), np.asarray(x, np.float32),
                               rtol=0.05, atol=0.05, err_msg=name)
