"""`layers.dot_product_attention`: its hand-written gradient against autodiff."""
import jax
import jax.numpy as jnp
import numpy as np

from ankh3_jax import layers

B, H, Q, K, D = 2, 3, 5, 6, 4


def attention_inputs(seed=0, head_dim=D):
  """(q, k, v, bias, mask, dropout keep) with padding queries and keys and a causal mask."""
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(B, H, n, head_dim)), jnp.float32)
             for n in (Q, K, K))
  bias = jnp.asarray(rng.normal(size=(1, H, Q, K)), jnp.float32)
  query_valid = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], bool)  # padding queries
  key_valid = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], bool)
  causal = np.tril(np.ones((Q, K), bool))
  mask = jnp.asarray(query_valid[:, None, :, None] & key_valid[:, None, None, :] & causal)
  keep = jnp.asarray(rng.binomial(1, 0.8, size=(B, H, Q, K)) / 0.8, jnp.float32)
  return q, k, v, bias, mask, keep


def _reference(q, k, v, bias, mask, keep):
  """The textbook form, differentiated by JAX: masked scores selected away."""
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) + bias
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1)
  if keep is not None:
    weights = weights * keep
  return jnp.einsum("bhqk,bhkd->bhqd", weights, v)


def test_masked_probabilities_are_exactly_zero_and_rows_sum_to_one():
  q, k, _, bias, mask, _ = attention_inputs()
  probs = np.asarray(layers._attention_weights(q, k, bias, mask))
  mask = np.broadcast_to(np.asarray(mask), probs.shape)
  sees_a_key = mask.any(-1, keepdims=True)
  assert np.all(probs[~mask & sees_a_key] == 0.0)
  assert (~sees_a_key).any()  # padding queries: uniform weights, as with a select
  np.testing.assert_allclose(probs[np.broadcast_to(~sees_a_key, probs.shape)], 1.0 / K)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) + bias
  expected = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
  np.testing.assert_allclose(probs, expected, rtol=1e-6, atol=1e-7)


def test_gradients_equal_autodiff_with_padding_rows_and_dropout():
  q, k, v, bias, mask, keep = attention_inputs()
  # A cotangent that is non-zero on the padding queries too: their rows see no key, so
  # the scores must get no gradient from them, though the values do (uniform weights).
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(B, H, Q, D)), jnp.float32)
  for dropout in (None, keep):
    ours_out, ours_vjp = jax.vjp(
        lambda *a: layers.dot_product_attention(*a, mask, dropout), q, k, v, bias)
    ref_out, ref_vjp = jax.vjp(lambda *a: _reference(*a, mask, dropout), q, k, v, bias)
    np.testing.assert_allclose(ours_out, ref_out, rtol=1e-5, atol=1e-6)
    for name, ours, ref in zip("qkv", ours_vjp(cotangent), ref_vjp(cotangent)):
      assert ours.shape == ref.shape, name
      np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5, err_msg=name)
    d_bias = ours_vjp(cotangent)[3]
    np.testing.assert_allclose(d_bias, ref_vjp(cotangent)[3], rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(d_bias).max()) > 0.0


def test_gradients_without_mask_or_bias():
  q, k, v, _, _, _ = attention_inputs(seed=2)
  grads = jax.grad(lambda *a: layers.dot_product_attention(*a, None, None, None).sum(),
                   argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(lambda *a: _reference(*a, 0.0, True, None).sum(), argnums=(0, 1, 2))(
      q, k, v)
  for ours, ref in zip(grads, expected):
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
