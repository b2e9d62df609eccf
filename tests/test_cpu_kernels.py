"""The native bfloat16 decode kernel (`cpu_kernels`): float32 results, gradients, its use
in bfloat16 decode steps, and the plain-XLA fallback where it cannot be built."""
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ankh3_jax import complete
from ankh3_jax import config as config_lib
from ankh3_jax import cpu_kernels
from ankh3_jax import decoding
from ankh3_jax import inference
from ankh3_jax import layers
from ankh3_jax import model as model_lib



@pytest.fixture
def kernels():
  """Builds (first time on this machine) and registers the kernels, or skips."""
  if not cpu_kernels.available():
    pytest.skip("no C++ compiler or no AVX2/FMA here")


needs_kernels = pytest.mark.usefixtures("kernels")
PROMPTS = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "MVLSPADKTNVKAAWGKV", "GSHMKK"]


def reference(kernel, rows):
  return np.asarray(rows, np.float64) @ np.asarray(kernel.astype(jnp.float32), np.float64).T


@needs_kernels
@pytest.mark.parametrize("out,inner,rows", [(13, 37, 1), (13, 37, 2), (13, 37, 3),
                                            (13, 37, 9), (130, 64, 4), (257, 100, 32)])
def test_float32_products_of_bfloat16_kernels(out, inner, rows):
  """Odd sizes reach every path: tails of `in`, single kernel rows, groups of rows."""
  key = jax.random.PRNGKey(out * rows)
  kernel = jax.random.normal(key, (out, inner)).astype(jnp.bfloat16)
  x = jax.random.normal(jax.random.fold_in(key, 1), (rows, inner))
  y = jax.jit(cpu_kernels.bf16_rows_product)(kernel, x)
  assert y.shape == (rows, out) and y.dtype == jnp.float32
  want = reference(kernel, x)
  np.testing.assert_allclose(np.asarray(y), want, rtol=0, atol=2e-6 * np.abs(want).max())


@needs_kernels
def test_avx2_path_matches(tmp_path):
  """The AVX2 + FMA path (AMD EPYC machines), built here without AVX-512."""
  path = str(tmp_path / "avx2.so")
  cpu_kernels.build(cpu_kernels._compiler(), path, ["-mno-avx512f"])
  cpu_kernels.register(path, "ankh3_test_avx2_rows_product")
  key = jax.random.PRNGKey(7)
  for out, inner, rows in [(13, 37, 3), (66, 64, 5)]:
    kernel = jax.random.normal(key, (out, inner)).astype(jnp.bfloat16)
    x = jax.random.normal(jax.random.fold_in(key, rows), (rows, inner))
    y = jax.jit(cpu_kernels.product_call, static_argnums=2)(
        kernel, x, "ankh3_test_avx2_rows_product")
    want = reference(kernel, x)
    np.testing.assert_allclose(np.asarray(y), want, rtol=0, atol=2e-6 * np.abs(want).max())


@needs_kernels
def test_rejects_other_dtypes_and_shapes():
  kernel = jnp.zeros((4, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match="bfloat16 \\[out, in\\] kernel"):
    cpu_kernels.bf16_rows_product(kernel, jnp.zeros((2, 7)))
  with pytest.raises(ValueError, match="float32"):
    cpu_kernels.bf16_rows_product(kernel.astype(jnp.float32), jnp.zeros((2, 8)))


@needs_kernels
def test_gradients_match_xla():
  key = jax.random.PRNGKey(0)
  kernel = jax.random.normal(key, (24, 40)).astype(jnp.bfloat16)
  x = jax.random.normal(jax.random.fold_in(key, 1), (3, 40))
  weights = jax.random.normal(jax.random.fold_in(key, 2), (3, 24))
  native = lambda k, r: jnp.sum(cpu_kernels.bf16_rows_product(k, r) * weights)
  plain = lambda k, r: jnp.sum(jnp.dot(r, k.astype(jnp.float32).T) * weights)
  for a, b in zip(jax.grad(native, (0, 1))(kernel, x), jax.grad(plain, (0, 1))(kernel, x)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_bf16():
  config = config_lib.preset("tiny")
  params = jax.tree.map(np.asarray, nn.unbox(model_lib.init_params(config, seed=3)))
  return config, params


@needs_kernels
def test_bfloat16_decode_steps_use_it_and_agree(tiny_bf16, monkeypatch):
  """Greedy tokens and scores as with XLA's widening; the compiled loop calls the kernel."""
  monkeypatch.setattr(layers, "FUSED_COPY_LIMIT_BYTES", 0)  # decoder held [out, in]
  model = inference.resolve_model(tiny_bf16, "float32", "bfloat16")
  assert model.config.decoder_kernels == "out_in"

  def run():
    decoding.compiled_generate.cache_clear()
    done = complete.complete(model, PROMPTS, max_new_tokens=12, batch_size=4)
    tokens = [c.token_ids for c in done]
    return tokens, [c.log_prob for c in done], complete.token_log_probs(model, PROMPTS,
                                                                        tokens)
  native = run()
  fn = decoding.compiled_generate(model.config, decoding.DecodeOptions("greedy", 4, 1))
  knobs = {"allowed": np.ones(model.config.vocab_size, bool), "temperature": np.float32(1),
           "top_k": np.int32(0), "top_p": np.float32(1), "length_penalty": np.float32(1),
           "rng": jax.random.PRNGKey(0)}
  with inference.matmul_precision("float32"):
    text = fn.lower(model.params, np.full((2, 16), 5, np.int32), knobs).compile().as_text()
  assert cpu_kernels.TARGET in text
  monkeypatch.setattr(cpu_kernels, "available", lambda: False)
  plain = run()
  assert native[0] == plain[0]
  np.testing.assert_allclose(native[1], plain[1], rtol=1e-5, atol=1e-5)
  for a, b in zip(native[2], plain[2]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  decoding.compiled_generate.cache_clear()


def _available_in_subprocess(tmp_path, **env) -> subprocess.CompletedProcess:
  code = textwrap.dedent("""
      import logging; logging.basicConfig()
      from ankh3_jax import cpu_kernels
      print("available", cpu_kernels.available(), "blas", cpu_kernels.blas_available())
  """)
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        check=True, timeout=300, env={
                            **os.environ, "ANKH3_JAX_CACHE_DIR": str(tmp_path),
                            "JAX_PLATFORMS": "cpu", **env})


def test_switched_off_by_the_environment(tmp_path):
  done = _available_in_subprocess(tmp_path, ANKH3_JAX_CPU_KERNELS="0", ANKH3_JAX_BLAS="1")
  assert "available False blas False" in done.stdout
  assert not (tmp_path / "cpu_kernels").exists()  # nothing built


def test_without_a_compiler_the_library_falls_back(tmp_path):
  done = _available_in_subprocess(tmp_path, CXX=str(tmp_path / "no-such-compiler"),
                                  ANKH3_JAX_BLAS="1")
  assert "available False blas False" in done.stdout
  assert "no C++ compiler" in done.stderr


def test_a_failed_build_leaves_nothing_behind(tmp_path):
  failing = tmp_path / "cxx"
  failing.write_text("#!/bin/sh\necho 'error: simulated' >&2\nexit 1\n")
  failing.chmod(0o755)
  done = _available_in_subprocess(tmp_path, CXX=str(failing))
  assert "available False" in done.stdout
  assert "simulated" in done.stderr and "exited 1" in done.stderr
  assert os.listdir(tmp_path / "cpu_kernels") == []  # no partial library


@needs_kernels
def test_built_once_per_machine(tmp_path):
  """The first process builds into the cache; the next one loads it without compiling."""
  first = _available_in_subprocess(tmp_path)
  assert "available True" in first.stdout
  built = os.listdir(tmp_path / "cpu_kernels")
  assert len(built) == 1 and built[0].endswith(".so")
  stamp = os.stat(tmp_path / "cpu_kernels" / built[0]).st_mtime_ns
  again = _available_in_subprocess(tmp_path)
  assert "available True" in again.stdout
  assert os.stat(tmp_path / "cpu_kernels" / built[0]).st_mtime_ns == stamp
