"""CPU tuning: Eigen matmuls (per program and process-wide), glibc keeping freed memory and
huge pages (process-wide settings in subprocesses), and what `ankh3-train` applies."""
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


_CHURN = """
import ctypes, ctypes.util, contextlib, sys
from ankh3_jax import cpu_tuning
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

def rss_mb():
  for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) / 1024

def touched(size):
  block = libc.malloc(size)
  libc.memset(block, 1, size)
  return block

def returned_mb():
  libc.free(touched(16 << 20))  # by default glibc now serves blocks below 16 MB from its heap
  blocks = []
  for _ in range(32):  # 2 MB blocks, each followed by a smaller live one
    blocks.append(touched(2 << 20))
    touched(256 << 10)
  before = rss_mb()
  for block in blocks:
    libc.free(block)
  return before - rss_mb()

scope = cpu_tuning.large_frees_returned if sys.argv[1] == "within" else contextlib.nullcontext
with scope():
  print(returned_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_large_frees_returned_gives_freed_blocks_back_to_the_os():
  returned = {}
  for mode in ("within", "default"):
    out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True,
                         text=True, check=True)
    returned[mode] = float(out.stdout)
  assert returned["within"] >= 56, returned  # of the 64 MB freed
  assert returned["default"] < 32, returned  # what the restore suffered from


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


_HUGE_PAGES = """
import ctypes, ctypes.util, os, sys
from ankh3_jax import cpu_tuning
os.environ.setdefault("FIRST_PID", str(os.getpid()))  # survives the restart
if sys.argv[1] == "restart":
  cpu_tuning.reexec_with_huge_pages()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20  # above malloc's mmap threshold, as XLA's per-step buffers are
block = libc.malloc(size)
ctypes.memset(block, 1, size)
with open("/proc/self/smaps_rollup", encoding="ascii") as f:
  huge_kb = next(int(l.split()[1]) for l in f if l.startswith("AnonHugePages:"))
print(os.environ.get("GLIBC_TUNABLES", ""), os.environ["FIRST_PID"] == str(os.getpid()),
      huge_kb, sep="|")
"""


@pytest.mark.skipif(not cpu_tuning.huge_pages_available(),
                    reason="needs Linux, glibc >= 2.35 and THP in 'madvise' mode")
def test_reexec_with_huge_pages_backs_malloc_blocks_with_huge_pages():
  env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.check=0")
  env.pop("ANKH3_JAX_REEXECUTED", None)
  runs = {}
  for mode in ("restart", "none"):
    out = subprocess.run([sys.executable, "-c", _HUGE_PAGES, mode], capture_output=True,
                         text=True, check=True, env=env)
    tunables, same_pid, huge_kb = out.stdout.strip().split("|")
    runs[mode] = (tunables, same_pid, int(huge_kb))
  # Restarted in place (same pid), the user's tunables kept, the new one added.
  assert runs["restart"][:2] == ("glibc.malloc.check=0:glibc.malloc.hugetlb=1", "True")
  assert runs["restart"][2] >= 128 * 1024  # most of the 256 MB block in 2 MB pages
  assert runs["none"] == ("glibc.malloc.check=0", "True", 0)  # no advice, no huge pages


def test_reexec_with_huge_pages_returns_where_the_user_chose(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
  cpu_tuning.reexec_with_huge_pages()  # would not return if it restarted pytest
  assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"


AVX2_EPYC = {"sse2", "avx", "avx2", "fma"}
AVX512_XEON = AVX2_EPYC | {"avx512f", "avx512bw", "avx512_vnni"}
AMX_XEON = AVX512_XEON | {"avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}


@pytest.mark.parametrize("flags,kind", [(AVX2_EPYC, "avx2"), (AVX512_XEON, "avx512"),
                                        (AMX_XEON, "amx"), ({"sse2"}, "other"), (set(), "other")])
def test_cpu_kind_and_train_dots_per_kind(flags, kind):
  assert cpu_tuning.cpu_kind(flags) == kind
  assert cpu_tuning.train_dots_for(flags) == cpu_tuning.TRAIN_DOTS_BY_KIND[kind]
  assert cpu_tuning.train_dots_for(flags) in ("eigen", "xla_default")


def test_cpu_flags_reads_the_first_processor(tmp_path):
  path = tmp_path / "cpuinfo"
  path.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n\n"
                  "processor\t: 1\nflags\t\t: fpu\n")
  assert cpu_tuning.cpu_flags(str(path)) == {"fpu", "avx2", "avx512f"}
  assert cpu_tuning.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_apply_train_dots_leaves_xla_alone_where_the_kind_says_so(tmp_path, monkeypatch):
  path = tmp_path / "cpuinfo"
  path.write_text("processor : 0\nflags : avx2 avx512f\n")
  monkeypatch.setitem(cpu_tuning.TRAIN_DOTS_BY_KIND, "avx512", "xla_default")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  assert cpu_tuning.apply_train_dots_for_this_cpu(str(path)) == "xla_default"
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"


_ONE_STEP = """
import sys
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
from ankh3_jax import config as config_lib, model as model_lib
from ankh3_jax.training import losses
cfg = config_lib.preset("tiny")
model = model_lib.Transformer(cfg)
params = nn.unbox(model_lib.init_params(cfg, seed=1))
rng = np.random.default_rng(0)
enc = rng.integers(5, 30, (4, 64)).astype(np.int32)
tgt = rng.integers(5, 30, (4, 64)).astype(np.int32)
def loss(p):
  logits = model.apply({"params": p}, enc, np.pad(tgt[:, :-1], ((0, 0), (1, 0))), tgt)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tgt))
value, grads = jax.jit(jax.value_and_grad(loss))(params)
flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
np.save(sys.argv[1], np.concatenate([[float(value)], flat]))
"""


@pytest.mark.skipif(not cpu_tuning.eigen_dots_flag_known(), reason="XLA aborts on the flag")
def test_chosen_cpu_dots_keep_float32_loss_and_gradients(tmp_path):
  """One tiny step's loss and gradients with this machine's chosen setting and without."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  results = {}
  for setting in ("eigen", "xla_default"):
    flags = cpu_tuning.EIGEN_DOTS_XLA_FLAG if setting == "eigen" else ""
    out = str(tmp_path / f"{setting}.npy")
    subprocess.run([sys.executable, "-c", _ONE_STEP, out], check=True, capture_output=True,
                   env=dict(env, XLA_FLAGS=flags))
    results[setting] = np.load(out)
  eigen, ynn = results["eigen"], results["xla_default"]
  assert eigen.shape == ynn.shape and np.all(np.isfinite(eigen))
  np.testing.assert_allclose(eigen[0], ynn[0], rtol=1e-6)  # the loss
  np.testing.assert_allclose(eigen[1:], ynn[1:], rtol=1e-4, atol=1e-6 * np.abs(ynn).max())
