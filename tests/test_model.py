"""The Flax model: shapes, logical axes, packing, remat, dropout, presets."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ankh3_jax import config as config_lib
from ankh3_jax import layers
from ankh3_jax import model as model_lib
from ankh3_jax import param_count

T5X_AXES = {"embed", "mlp", "heads", "kv", "joined_kv", "vocab", "relpos_buckets", "layers"}


def _batch():
  enc = jnp.array([[3, 5, 6, 7, 8, 1, 0, 0], [3, 9, 10, 1, 0, 0, 0, 0]])
  tgt = jnp.array([[5, 6, 7, 1, 0, 0], [9, 10, 11, 12, 1, 0]])
  dec_in = jnp.pad(tgt[:, :-1], ((0, 0), (1, 0)))
  return enc, dec_in, tgt


def _init(cfg, enc, dec_in, tgt):
  return model_lib.Transformer(cfg).init(jax.random.key(0), enc, dec_in, tgt)


@pytest.mark.parametrize("overrides", [
    {}, {"scan_layers": True}, {"tie_word_embeddings": True, "feed_forward_proj": "relu"},
    {"feed_forward_proj": "gated-gelu"}])
def test_every_parameter_has_t5x_logical_axes(overrides):
  cfg = config_lib.preset("tiny", **overrides)
  params = _init(cfg, *_batch())["params"]
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), leaf
    assert len(leaf.names) == leaf.value.ndim
    assert set(leaf.names) <= T5X_AXES, leaf.names


def test_shapes_and_dtypes_bf16_activations():
  cfg = config_lib.preset("tiny", dtype=jnp.bfloat16)
  enc, dec_in, tgt = _batch()
  variables = _init(cfg, enc, dec_in, tgt)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(variables)))
  m = model_lib.Transformer(cfg)
  logits = m.apply(variables, enc, dec_in, tgt, enable_dropout=False)
  assert logits.shape == (2, 6, cfg.vocab_size) and logits.dtype == jnp.float32
  encoded = m.apply(variables, enc, enable_dropout=False, method=m.encode)
  assert encoded.shape == (2, 8, cfg.d_model) and encoded.dtype == jnp.bfloat16
  f32 = model_lib.Transformer(cfg.replace(dtype=jnp.float32)).apply(
      variables, enc, dec_in, tgt, enable_dropout=False)
  np.testing.assert_allclose(logits, f32, atol=0.15 * float(jnp.abs(f32).max()))


def test_packed_row_equals_examples_run_alone():
  cfg = config_lib.preset("tiny")
  m = model_lib.Transformer(cfg)
  a_enc, a_tgt = [3, 5, 6, 7, 1], [8, 9, 1]
  b_enc, b_tgt = [4, 10, 11, 1], [12, 13, 14, 1]
  shift = lambda t: [0] + t[:-1]
  pad = lambda x, n: x + [0] * (n - len(x))
  enc = jnp.array([pad(a_enc + b_enc, 10)])
  tgt = jnp.array([pad(a_tgt + b_tgt, 8)])
  dec_in = jnp.array([pad(shift(a_tgt) + shift(b_tgt), 8)])
  enc_seg = jnp.array([pad([1] * 5 + [2] * 4, 10)])
  dec_seg = jnp.array([pad([1] * 3 + [2] * 4, 8)])
  variables = _init(cfg, enc, dec_in, tgt)
  packed = m.apply(variables, enc, dec_in, tgt, enc_seg, dec_seg, enable_dropout=False)
  for (e, t), (start, stop) in (((a_enc, a_tgt), (0, 3)), ((b_enc, b_tgt), (3, 7))):
    alone = m.apply(variables, jnp.array([e]), jnp.array([shift(t)]), jnp.array([t]),
                    enable_dropout=False)
    np.testing.assert_allclose(packed[0, start:stop], alone[0], atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_gradients(policy):
  enc, dec_in, tgt = _batch()
  cfg = config_lib.preset("tiny")
  params = _init(cfg, enc, dec_in, tgt)["params"]

  def grads(c):
    m = model_lib.Transformer(c)
    loss = lambda p: jnp.sum(m.apply({"params": p}, enc, dec_in, tgt, enable_dropout=False) ** 2)
    return jax.grad(loss)(params)

  for a, b in zip(jax.tree.leaves(grads(cfg)), jax.tree.leaves(grads(cfg.replace(remat_policy=policy)))):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(jnp.abs(a).max()))


def test_dropout_only_when_enabled():
  enc, dec_in, tgt = _batch()
  cfg = config_lib.preset("tiny", dropout_rate=0.3)
  m = model_lib.Transformer(cfg)
  variables = _init(cfg, enc, dec_in, tgt)
  off = [m.apply(variables, enc, dec_in, tgt, enable_dropout=False) for _ in range(2)]
  np.testing.assert_array_equal(off[0], off[1])
  on = [m.apply(variables, enc, dec_in, tgt, rngs={"dropout": jax.random.key(i)}) for i in range(2)]
  assert float(jnp.abs(on[0] - on[1]).max()) > 1e-3
  assert float(jnp.abs(on[0] - off[0]).max()) > 1e-3


def test_relative_position_buckets_known_values():
  b = layers.relative_position_buckets(1, 300, bidirectional=True, num_buckets=32,
                                       max_distance=128)[0]
  assert b[0] == 0 and b[1] == 17 and b[7] == 16 + 7  # exact region: one bucket per offset
  assert b[8] > b[7] and b[299] == 31  # log region, capped at the last bucket
  causal = layers.relative_position_buckets(300, 1, bidirectional=False, num_buckets=32,
                                            max_distance=128)[:, 0]
  assert causal[0] == 0 and causal[15] == 15 and causal[299] == 31
  future = layers.relative_position_buckets(1, 5, bidirectional=False, num_buckets=32,
                                            max_distance=128)[0]
  assert (future == 0).all()  # the decoder never sees the future: all in bucket 0
  assert np.all(np.diff(b[:200]) >= 0)


def test_unknown_preset_and_activation_are_clear_errors():
  with pytest.raises(ValueError, match="unknown model preset 'huge'"):
    config_lib.preset("huge")
  cfg = config_lib.preset("tiny", feed_forward_proj="gated-swish")
  with pytest.raises(ValueError, match="unsupported feed_forward_proj 'gated-swish'"):
    _init(cfg, *_batch())


def test_config_round_trips_through_dict():
  cfg = config_lib.preset("small", dtype=jnp.bfloat16, scan_layers=True)
  assert config_lib.config_from_dict(config_lib.config_to_dict(cfg)) == cfg
  with pytest.raises(ValueError, match="unknown T5Config fields: \\['colour'\\]"):
    config_lib.config_from_dict({"colour": 1})


@pytest.mark.parametrize("name", sorted(config_lib.PUBLISHED_ENCODER_PARAMS))
def test_preset_encoder_counts_match_published(name):
  counts = param_count.count_params(config_lib.preset(name))
  published = config_lib.PUBLISHED_ENCODER_PARAMS[name]
  assert abs(counts["encoder"] - published) / published < 0.005, counts


def test_param_count_cli_prints_every_preset(capsys):
  param_count.main(["tiny", "ankh3_large"])
  out = capsys.readouterr().out
  assert "1,151,879,680" in out and "tiny" in out and "230,656" in out


def test_decode_step_without_max_decode_length_is_a_clear_error():
  cfg = config_lib.preset("tiny")
  m = model_lib.Transformer(cfg)
  enc, dec_in, tgt = _batch()
  variables = _init(cfg, enc, dec_in, tgt)
  encoded = m.apply(variables, enc, enable_dropout=False, method=m.encode)
  _, state = m.apply(variables, encoded, enc, jnp.zeros_like(tgt), jnp.zeros_like(tgt),
                     enable_dropout=False, decode=True, max_decode_length=tgt.shape[1],
                     mutable=["cache"], method=m.decode)
  step = jnp.zeros((2, 1), jnp.int32)
  with pytest.raises(ValueError, match="pass max_decode_length=6"):
    m.apply({**variables, **state}, encoded, enc, step, step, enable_dropout=False,
            decode=True, mutable=["cache"], method=m.decode)
