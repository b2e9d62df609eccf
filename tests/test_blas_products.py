"""The sgemm route for float32 products (`cpu_kernels.blas_matmul`, `blas_product`):
results against float64, gradients against XLA's, its use in the model's projections and
attention, the choice per CPU kind and its switches, and the fallback to XLA."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ankh3_jax import config as config_lib
from ankh3_jax import cpu_kernels
from ankh3_jax import cpu_tuning
from ankh3_jax import layers
from ankh3_jax import model as model_lib


@pytest.fixture
def blas():
  """Builds and registers the route (whatever this CPU's kind chose), or skips."""
  if not cpu_kernels.blas_ready():
    pytest.skip("no native kernels or no OpenBLAS in numpy here")


needs_blas = pytest.mark.usefixtures("blas")


def _route(monkeypatch, on: bool) -> None:
  monkeypatch.setattr(cpu_kernels, "blas_available", lambda: on)


def _as64(x, trans):
  x = np.asarray(x, np.float64)
  return np.swapaxes(x, -1, -2) if trans else x


@needs_blas
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("batch,m,n,k", [((), 1, 1, 1), ((), 300, 70, 130), ((), 5, 257, 9),
                                         ((3,), 65, 64, 16), ((2, 3), 17, 129, 33)])
def test_products_match_float64(batch, m, n, k, trans_a, trans_b):
  """Row blocks, column blocks, batches and every transposition, at odd sizes."""
  key = jax.random.PRNGKey(m * n + k)
  a = jax.random.normal(key, batch + ((k, m) if trans_a else (m, k)))
  b = jax.random.normal(jax.random.fold_in(key, 1), batch + ((n, k) if trans_b else (k, n)))
  c = jax.jit(cpu_kernels.blas_product, static_argnums=(2, 3))(a, b, trans_a, trans_b)
  want = _as64(a, trans_a) @ _as64(b, trans_b)
  assert c.shape == batch + (m, n) and c.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(c), want, rtol=0, atol=1e-5 * np.abs(want).max())


@needs_blas
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("interleaved", [(False, True, True), (True, False, False),
                                         (True, True, False), (False, False, True)])
def test_interleaved_operands_match_float64(interleaved, trans_a):
  """[B, rows, H, columns] operands and results (heads between rows and columns, as the
  projections lay them out) give the products of their (B, H) matrices."""
  big, heads, m, n, k = 2, 3, 70, 33, 17
  key = jax.random.PRNGKey(11)
  stacked_a = jax.random.normal(key, (big, heads) + ((k, m) if trans_a else (m, k)))
  stacked_b = jax.random.normal(jax.random.fold_in(key, 1), (big, heads, k, n))
  to_inter = lambda x, on: jnp.swapaxes(x, 1, 2) if on else x
  c = jax.jit(lambda a, b: cpu_kernels.blas_product(a, b, trans_a=trans_a,
                                                    interleaved=interleaved))(
      to_inter(stacked_a, interleaved[0]), to_inter(stacked_b, interleaved[1]))
  want = _as64(stacked_a, trans_a) @ _as64(stacked_b, False)
  assert c.shape == ((big, m, heads, n) if interleaved[2] else (big, heads, m, n))
  np.testing.assert_allclose(np.asarray(to_inter(c, interleaved[2])), want, rtol=0,
                             atol=1e-5 * np.abs(want).max())


@needs_blas
def test_interleaved_operands_are_checked():
  with pytest.raises(ValueError, match="interleaved operand is \\[B, rows, H, columns\\]"):
    cpu_kernels.blas_product(jnp.zeros((6, 4, 5)), jnp.zeros((6, 5, 2)),
                             interleaved=(True, False, False))
  with pytest.raises(ValueError, match="do not agree"):  # H 3 against a batch of [2, 4]
    cpu_kernels.blas_product(jnp.zeros((2, 4, 7, 5)), jnp.zeros((2, 5, 3, 6)),
                             interleaved=(False, True, False))


@needs_blas
def test_empty_contraction_gives_zeros():
  c = jax.jit(cpu_kernels.blas_product)(jnp.ones((4, 0)), jnp.ones((0, 3)))
  np.testing.assert_array_equal(np.asarray(c), np.zeros((4, 3), np.float32))


@needs_blas
def test_results_are_reproducible():
  """Fixed blocks: the same inputs give the same bits (exact resumes rely on it)."""
  key = jax.random.PRNGKey(3)
  a, b = jax.random.normal(key, (512, 384)), jax.random.normal(key, (384, 320))
  fn = jax.jit(cpu_kernels.blas_matmul)
  np.testing.assert_array_equal(np.asarray(fn(a, b)), np.asarray(fn(a, b)))


@needs_blas
def test_gradients_match_xla():
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (96, 40))
  kernel = jax.random.normal(jax.random.fold_in(key, 1), (40, 24))
  weights = jax.random.normal(jax.random.fold_in(key, 2), (96, 24))
  routed = lambda x, k: jnp.sum(cpu_kernels.blas_matmul(x, k) * weights)
  plain = lambda x, k: jnp.sum(jnp.dot(x, k) * weights)
  got = jax.jit(jax.grad(routed, (0, 1)))(x, kernel)
  for a, b in zip(got, jax.grad(plain, (0, 1))(x, kernel)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


@needs_blas
def test_rejects_other_dtypes_and_shapes():
  with pytest.raises(ValueError, match="float32 \\[rows, in\\]"):
    cpu_kernels.blas_matmul(jnp.zeros((2, 8), jnp.bfloat16), jnp.zeros((8, 4)))
  with pytest.raises(ValueError, match="float32 \\[rows, in\\]"):
    cpu_kernels.blas_matmul(jnp.zeros((2, 7)), jnp.zeros((8, 4)))


@needs_blas
def test_counting_products_by_shape():
  """Inside the window each product's calls, thread time and work are added to its shape;
  outside it nothing is counted."""
  a, b = jnp.ones((4, 300, 40)), jnp.ones((4, 40, 24))
  product = jax.jit(lambda a, b: cpu_kernels.blas_product(a, b, trans_b=False))
  jax.block_until_ready(product(a, b))  # compiled and run before the window: not counted
  with cpu_kernels.counting_products() as rows:
    for _ in range(3):
      jax.block_until_ready(product(a, b))
  assert len(rows) == 1, rows
  row = rows[0]
  assert (row["m"], row["n"], row["k"], row["batch"]) == (300, 24, 40, 4)
  assert not row["trans_a"] and not row["trans_b"]
  assert row["calls"] >= 3 * 4 and row["seconds"] > 0
  assert row["flops"] == 3 * 2 * 4 * 300 * 24 * 40
  jax.block_until_ready(product(a, b))
  with cpu_kernels.counting_products() as rows:
    pass
  assert rows == []


@pytest.fixture(scope="module")
def tiny():
  config = config_lib.preset("tiny")
  return config, nn.unbox(model_lib.init_params(config, seed=5))


def _loss_and_grads(config, params, on: bool, monkeypatch):
  _route(monkeypatch, on)
  model = model_lib.Transformer(config)
  rng = np.random.default_rng(0)
  enc = rng.integers(5, 25, (2, 48)).astype(np.int32)
  dec_in = rng.integers(5, 25, (2, 40)).astype(np.int32)
  targets = rng.integers(5, 25, (2, 40)).astype(np.int32)

  def loss(p):
    logits = model.apply({"params": p}, enc, dec_in, targets, enable_dropout=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  fn = jax.jit(jax.value_and_grad(loss))
  hlo = fn.lower(params).compile().as_text()
  return fn(params), hlo


@needs_blas
def test_model_loss_and_gradients_as_with_xla(tiny, monkeypatch):
  """A tiny model's loss and every gradient through the route agree with XLA's products,
  and the compiled step calls the sgemm only when the route is on."""
  config, params = tiny
  (loss_on, grads_on), hlo_on = _loss_and_grads(config, params, True, monkeypatch)
  (loss_off, grads_off), hlo_off = _loss_and_grads(config, params, False, monkeypatch)
  assert cpu_kernels.BLAS_TARGET in hlo_on and cpu_kernels.BLAS_TARGET not in hlo_off
  np.testing.assert_allclose(float(loss_on), float(loss_off), rtol=1e-6)
  flat_off = dict(jax.tree_util.tree_leaves_with_path(grads_off))
  for path, a in jax.tree_util.tree_leaves_with_path(grads_on):
    b = flat_off[path]
    scale = float(jnp.max(jnp.abs(b))) or 1.0
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-4 * scale,
                               err_msg=jax.tree_util.keystr(path))


def _dense_hlo(rows: int, dtype=jnp.float32, remat_policy="none") -> str:
  config = config_lib.preset("tiny").replace(dtype=dtype, remat_policy=remat_policy)
  dense = layers.Dense(32, ("embed", "mlp"), config)
  x = jnp.ones((rows, 16), dtype)
  params = dense.init(jax.random.PRNGKey(0), x)
  return jax.jit(dense.apply).lower(params, x).compile().as_text()


@needs_blas
def test_where_the_route_serves(monkeypatch):
  """Whole blocks of rows take it; decode steps' few rows, bfloat16 activations, remat's
  'dots' policy (which saves only XLA's dots) and sharded runs keep XLA's products."""
  _route(monkeypatch, True)
  assert cpu_kernels.BLAS_TARGET in _dense_hlo(cpu_kernels.BLAS_MIN_ROWS)
  assert cpu_kernels.BLAS_TARGET not in _dense_hlo(cpu_kernels.BLAS_MIN_ROWS - 1)
  assert cpu_kernels.BLAS_TARGET not in _dense_hlo(128, jnp.bfloat16)
  assert cpu_kernels.BLAS_TARGET not in _dense_hlo(128, remat_policy="dots")
  x = jnp.ones((128, 16))
  assert cpu_kernels.use_blas(128, x, x)
  monkeypatch.setattr(jax, "device_count", lambda: 2)
  assert not cpu_kernels.use_blas(128, x, x)


@needs_blas
def test_attention_products_need_no_transposed_copies(monkeypatch):
  """The attention's custom calls (the fused forward and backward) read and write the
  projections' [b, l, h, d] layout in place: no copy or transpose makes their operands or
  takes their results (one attention layer)."""
  _route(monkeypatch, True)
  config = config_lib.preset("tiny")
  attention = layers.MultiHeadAttention(config)
  x = jnp.ones((2, 64, config.d_model))
  params = attention.init(jax.random.PRNGKey(0), x, x, None, None, True)
  loss = lambda p, x: jnp.sum(attention.apply(p, x, x, None, None, True) ** 2)
  hlo = jax.jit(jax.grad(loss, (0, 1))).lower(params, x).compile().as_text()
  defs = dict(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", hlo, re.M))
  is_copy = lambda name: name.startswith(("copy", "transpose"))
  heads = [n for n, d in defs.items()
           if cpu_kernels.ATTENTION_FORWARD_TARGET in d
           or cpu_kernels.ATTENTION_BACKWARD_TARGET in d]
  assert len(heads) == 2, heads  # the forward, the backward
  for name in heads:
    operands = re.search(r"custom-call\(([^)]*)\)", defs[name]).group(1)
    operands = operands.replace("%", "").split(", ")
    assert not [o for o in operands if is_copy(o)], (name, operands)
    users = [n for n, u in defs.items() if re.search(rf"%{re.escape(name)}\b", u)]
    users += [n for n, u in defs.items() if any(re.search(rf"%{re.escape(g)}\b", u)
                                                for g in users if g.startswith("get-tuple"))]
    assert not [u for u in users if is_copy(u)], (name, users)


def _attention_inputs(b, h, q, k, d, masking, with_bias, spread=1.0):
  """Random query, key, value [b, h, *, d] (times `spread`), bias [1, h, q, k] or None,
  and a mask: none, padded keys (the last batch row sees no key at all) or causal."""
  keys = jax.random.split(jax.random.PRNGKey(7), 4)
  query, key, value = (spread * jax.random.normal(keys[i], (b, h, n, d)) for i, n in
                       ((0, q), (1, k), (2, k)))
  bias = jax.random.normal(keys[3], (1, h, q, k)) if with_bias else None
  mask = None
  if masking == "padding":
    lengths = jnp.array([k, k // 2 - 7, 0])[:b]
    mask = (jnp.arange(k)[None, :] < lengths[:, None])[:, None, None, :]
  elif masking == "causal":
    mask = (jnp.arange(q)[:, None] + (k - q) >= jnp.arange(k)[None, :])[None, None]
  return query, key, value, bias, mask


@needs_blas
@pytest.mark.parametrize("masking", ["none", "padding", "causal"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("spread", [1.0, 6.0])
def test_fused_attention_forward_matches_xla(monkeypatch, masking, with_bias, spread):
  """The forward as one custom call (scores, softmax in cache, weights by values) is as
  close to float64 as XLA's: lengths that are not multiples of 8, padded keys (a row that
  sees none averages the values, as XLA's does), causal masks, with and without the bias,
  and scores spread wide enough that most weights underflow to 0."""
  query, key, value, bias, mask = _attention_inputs(3, 4, 48, 83, 16, masking, with_bias,
                                                    spread)
  q64, k64, v64 = (np.asarray(x, np.float64) for x in (query, key, value))
  scores = np.einsum("bhqd,bhkd->bhqk", q64, k64) + (0 if bias is None else np.asarray(bias))
  seen = np.ones(scores.shape, bool) if mask is None else np.broadcast_to(mask, scores.shape)
  scores = np.where(seen, scores, -np.inf)
  scores = np.where(seen.any(-1, keepdims=True), scores, 0.0)  # sees none: uniform
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  want = np.einsum("bhqk,bhkd->bhqd", weights / weights.sum(-1, keepdims=True), v64)
  errors = {}
  for on in (True, False):
    _route(monkeypatch, on)
    attend = jax.jit(lambda *a: layers.dot_product_attention(*a, mask, None))
    assert (cpu_kernels.ATTENTION_FORWARD_TARGET in attend.lower(
        query, key, value, bias).as_text()) == on
    errors[on] = np.max(np.abs(np.asarray(attend(query, key, value, bias)) - want))
  assert errors[True] <= 2 * errors[False] + 1e-6 * np.max(np.abs(want)), errors


def _attention_grads(query, key, value, bias, mask, keep):
  loss = lambda q, k, v, b: jnp.sum(jnp.sin(layers.dot_product_attention(q, k, v, b, mask,
                                                                         keep)))
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  fn = jax.jit(jax.grad(loss, argnums))
  return fn(query, key, value, bias), fn.lower(query, key, value, bias).compile().as_text()


@needs_blas
@pytest.mark.parametrize("masking", ["none", "padding", "causal"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_attention_backward_matches_xla(monkeypatch, masking, with_bias):
  """The backward as one custom call gives XLA's gradients: self- and cross-attention
  lengths, padded keys (and query rows that see none), causal masks, with and without the
  position bias (its gradient summed over the batch)."""
  query, key, value, bias, mask = _attention_inputs(3, 4, 48, 80, 16, masking, with_bias)
  _route(monkeypatch, True)
  fused, hlo = _attention_grads(query, key, value, bias, mask, None)
  assert cpu_kernels.ATTENTION_BACKWARD_TARGET in hlo
  assert cpu_kernels.ATTENTION_FORWARD_TARGET in hlo
  _route(monkeypatch, False)
  plain, hlo = _attention_grads(query, key, value, bias, mask, None)
  assert cpu_kernels.ATTENTION_BACKWARD_TARGET not in hlo
  for got, want in zip(fused, plain):
    scale = float(jnp.max(jnp.abs(want))) or 1.0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * scale)


@needs_blas
def test_fused_attention_backward_is_reproducible(monkeypatch):
  """Each head is one task summing its batch in order: the same bits every run."""
  _route(monkeypatch, True)
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 6, 64, 16))
  bias = jax.random.normal(jax.random.PRNGKey(3), (1, 6, 64, 64))
  first, _ = _attention_grads(x, x, x, bias, None, None)
  again, _ = _attention_grads(x, x, x, bias, None, None)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_blas
def test_dropout_keeps_the_unfused_attention(monkeypatch):
  _route(monkeypatch, True)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 32, 16))
  keep = jnp.where(jax.random.bernoulli(jax.random.PRNGKey(1), 0.9, (2, 4, 32, 32)), 1 / 0.9,
                   0.0)
  _, hlo = _attention_grads(x, x, x, None, None, keep)
  assert cpu_kernels.ATTENTION_BACKWARD_TARGET not in hlo
  assert cpu_kernels.ATTENTION_FORWARD_TARGET not in hlo
  assert cpu_kernels.BLAS_TARGET in hlo


def test_chosen_per_cpu_kind_unless_the_environment_says(monkeypatch):
  avx2 = frozenset({"avx2", "fma"})
  avx512 = avx2 | {"avx512f"}
  assert cpu_tuning.blas_products_for(avx2) is cpu_tuning.BLAS_PRODUCTS_BY_KIND["avx2"]
  assert cpu_tuning.blas_products_for(avx512) is cpu_tuning.BLAS_PRODUCTS_BY_KIND["avx512"]
  monkeypatch.setitem(cpu_tuning.BLAS_PRODUCTS_BY_KIND, "avx2", True)
  monkeypatch.setitem(cpu_tuning.BLAS_PRODUCTS_BY_KIND, "avx512", False)
  for flags, chosen in [(avx2, True), (avx512, False)]:
    monkeypatch.setattr(cpu_tuning, "cpu_flags", lambda *_, flags=flags: flags)
    monkeypatch.delenv(cpu_tuning.BLAS_ENV_SWITCH, raising=False)
    assert cpu_tuning.blas_products_chosen() is chosen
    monkeypatch.setenv(cpu_tuning.BLAS_ENV_SWITCH, "auto")
    assert cpu_tuning.blas_products_chosen() is chosen
    monkeypatch.setenv(cpu_tuning.BLAS_ENV_SWITCH, "1")
    assert cpu_tuning.blas_products_chosen()
    monkeypatch.setenv(cpu_tuning.BLAS_ENV_SWITCH, "0")
    assert not cpu_tuning.blas_products_chosen()
  monkeypatch.setenv(cpu_tuning.BLAS_ENV_SWITCH, "yes")
  with pytest.raises(ValueError, match="ANKH3_JAX_BLAS='yes': use 1, 0 or auto"):
    cpu_tuning.blas_products_chosen()


def test_without_numpy_openblas_the_route_is_off(monkeypatch):
  """A numpy built without its OpenBLAS (or another BLAS): XLA's products, not an error."""
  monkeypatch.setattr(cpu_kernels, "available", lambda: True)
  monkeypatch.setattr(cpu_kernels, "_numpy_sgemm", lambda: None)
  assert cpu_kernels.blas_ready.__wrapped__() is False


def test_numpy_openblas_is_found_where_numpy_ships_it():
  """numpy's wheels carry scipy-openblas64; the route finds its sgemm by address."""
  addresses = cpu_kernels._numpy_sgemm()
  if addresses is None:
    pytest.skip("this numpy carries no OpenBLAS")
  sgemm, threads = addresses
  assert sgemm and (threads is None or threads > 0)
