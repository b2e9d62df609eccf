"""CPU tuning: per-program Eigen matmuls, and glibc keeping freed memory (subprocess)."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ankh3_jax import cpu_tuning


def test_eigen_dot_options_keep_matmuls_out_of_ynnpack():
  options = cpu_tuning.eigen_dot_options()
  assert options == cpu_tuning.EIGEN_DOTS_COMPILER_OPTIONS  # the tests run on the CPU
  a = jax.random.normal(jax.random.key(0), (256, 256))
  f = lambda x: jnp.tanh(x @ x)
  eigen = jax.jit(f, compiler_options=options).lower(a).compile()
  assert "__ynn_fusion" not in eigen.as_text()
  np.testing.assert_allclose(np.asarray(eigen(a)), np.asarray(jax.jit(f)(a)),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_retain_freed_memory_sets_malloc_options():
  code = ("from ankh3_jax import cpu_tuning\n"
          "import numpy as np\n"
          "ok = cpu_tuning.retain_freed_memory()\n"
          "print(ok)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "True"


def test_prefer_eigen_dots_refuses_after_backend_start():
  jax.devices()  # the backend exists in this process by now
  with pytest.raises(RuntimeError, match="before JAX initialises"):
    cpu_tuning.prefer_eigen_dots()
