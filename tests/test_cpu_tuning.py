"""CPU tuning: per-program Eigen matmuls, and glibc keeping freed memory (subprocess)."""
import os
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


def test_prefer_eigen_dots_if_known_leaves_unknown_releases_and_user_flags(monkeypatch):
  import jaxlib  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  monkeypatch.setattr(jaxlib, "__version__", "0.99.0")
  assert not cpu_tuning.eigen_dots_flag_known()
  assert not cpu_tuning.prefer_eigen_dots_if_known()
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  monkeypatch.undo()
  own = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
  monkeypatch.setenv("XLA_FLAGS", own)
  assert not cpu_tuning.prefer_eigen_dots_if_known()  # the user's choice, untouched
  assert os.environ["XLA_FLAGS"] == own


_TRAIN_SETTINGS = """
import os, sys
from ankh3_jax import cpu_tuning, main
args, _ = main.parse_args(sys.argv[1:])
main.apply_process_settings(args)
import jax, jax.numpy as jnp
a = jnp.ones((256, 256))
text = jax.jit(lambda x: x @ x).lower(a).compile().as_text()
print(cpu_tuning.eigen_dots_flag_known(), os.environ.get("XLA_FLAGS", ""),
      "__ynn_fusion" in text, float(jax.jit(lambda x: x @ x)(a)[0, 0]), sep="|")
"""


@pytest.mark.parametrize("cpu_dots", ["eigen", "xla_default"])
def test_ankh3_train_cpu_dots_setting_reaches_xla(cpu_dots):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", _TRAIN_SETTINGS, f"--cpu_dots={cpu_dots}"],
                       capture_output=True, text=True, check=True, env=env)
  known, flags, ynn_matmul, value = out.stdout.strip().split("|")
  assert float(value) == 256.0
  if cpu_dots == "eigen" and known == "True":  # this lock's jaxlib: the flag is accepted
    assert flags == cpu_tuning.EIGEN_DOTS_XLA_FLAG
    assert ynn_matmul == "False"
  else:
    assert flags == ""
    assert ynn_matmul == "True"  # XLA's default: matmuls in YNNPACK
