"""CPU settings that speed up XLA:CPU programs (measured in docs/performance.md).

- `eigen_dot_options()`: per-program compiler options that run matrix multiplications
  with XLA's Eigen kernels instead of YNNPACK fusions. Only that program changes, so the
  library uses it where it measured faster: the completion decode loop, whose matmuls
  have few rows (YNNPACK's per-call cost dominates there: 0.22 against 0.11 ms for a
  16 x 256 by 256 x 256 product). Not in training: the `small` step measured 0-15%
  slower with it (YNNPACK wins on its large matmuls).

The process-wide settings below are functions to call first thing in a training or
benchmark script (before JAX or TensorFlow starts a thread), never applied on import.
`ankh3-train` applies the second and third by default (`--huge_pages`, `--cpu_dots auto`)
and the first when asked (`--retain_freed_memory`):

- `retain_freed_memory()`: XLA:CPU allocates each execution's temporary buffers afresh
  (about 1.6 GB for the `small` train step at batch 16 x 512 tokens). glibc serves
  allocations above 32 MB with `mmap` and unmaps them on free, so every step page-faults
  its whole working set again (~385k faults, 1.3-1.5 s of kernel time per `small` step on
  2 busy cores, measured). This makes glibc serve them from its heap and never trim it,
  so later steps reuse the memory without faults. Cost: the process keeps its peak
  memory mapped until it exits (the heap holds two steps' buffers, since the next step
  allocates before the previous one frees: peak RSS 2.2 -> 3.6 GB for `small`, and once
  6.6 GB from fragmentation, with a slower step), and all threads share one malloc arena.
- `reexec_with_huge_pages()`: restarts the process (same pid and arguments) with the glibc
  tunable that has malloc ask for transparent huge pages on the large blocks it maps
  (`glibc.malloc.hugetlb=1`, glibc >= 2.35, kernels with THP in 'madvise' mode). XLA:CPU's
  per-step temporary buffers then fault in 2 MB at a time instead of 4 kB: 13-40% faster
  `tiny` and `small` train steps here, same peak memory (the peer's PyTorch step gained
  nothing from it). Tunables are read when a process starts, hence the restart.
- `prefer_eigen_dots()`: the process-wide flag for the individual dots (an experimental
  XLA flag; 11-30% faster `small` train steps on the 2-core AVX2 machine, `tiny` within
  the noise). It must run before JAX creates its CPU backend, and XLA aborts the process
  on a flag it does not know, so `prefer_eigen_dots_if_known()` applies it only under the
  jaxlib releases it was checked with (`EIGEN_DOTS_JAXLIB_RELEASES`). The flag only
  concerns XLA:CPU; other backends ignore it.
- `large_frees_returned()`: a context in which glibc gives every allocation of 128 KiB or
  more its own mapping, unmapped when freed. By default glibc raises that threshold to
  the size of the first large block freed, so the buffers a checkpoint restore reads and
  drops then stay in its heap: 170-210 MB of peak memory when loading `ankh3_large`'s
  encoder, measured. `model_io.load_model` restores inside it.
- `train_dots_for(cpu_flags)`: which matmul setting a train step gets on a CPU kind
  (`cpu_kind`: AVX2, AVX-512, AMX, from /proc/cpuinfo's flags), `TRAIN_DOTS_BY_KIND`;
  `apply_train_dots_for_this_cpu()` applies it (`ankh3-train --cpu_dots auto`, the default).
- `blas_products_for(cpu_flags)`: whether float32 products go through numpy's OpenBLAS
  (`cpu_kernels.blas_matmul`) on a CPU kind, `BLAS_PRODUCTS_BY_KIND`;
  `blas_products_chosen()` for this machine, unless `ANKH3_JAX_BLAS` says (every program,
  not only `ankh3-train`).
"""
import contextlib
import ctypes
import ctypes.util
import functools
import os
import platform
import sys
from typing import Collection, Optional

EIGEN_DOTS_COMPILER_OPTIONS = {
    # The YNNPACK fusion kinds to use: none for matmuls (convolutions only).
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
EIGEN_DOTS_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"
# jaxlib releases (version prefixes) that accept EIGEN_DOTS_XLA_FLAG, checked by
# tests/test_cpu_tuning.py; extend after checking a new release.
EIGEN_DOTS_JAXLIB_RELEASES = ("0.10.",)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# glibc's fixed mmap threshold inside `large_frees_returned`, and the one left after it:
# the largest its dynamic threshold reaches on 64-bit systems, with the heap trimmed only
# past twice that (as glibc's dynamic setting does).
_MMAP_THRESHOLD_MIN, _MMAP_THRESHOLD_MAX = 128 << 10, 32 << 20


def _glibc() -> Optional[ctypes.CDLL]:
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  return ctypes.CDLL(ctypes.util.find_library("c"))


def retain_freed_memory() -> bool:
  """Configures glibc malloc as above; returns False (and does nothing) without glibc."""
  libc = _glibc()
  if libc is None:
    return False
  # mallopt returns 1 on success. -1 disables trimming; 0 disables mmap for allocations.
  return all(libc.mallopt(option, value) == 1 for option, value in
             ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1)))


@contextlib.contextmanager
def large_frees_returned():
  """Within: allocations of 128 KiB or more are mapped on their own and unmapped when
  freed (see above). On leaving, the threshold is 32 MiB, where glibc's own would be
  after large frees. Nothing happens without glibc; under `retain_freed_memory` (no
  mappings at all) the threshold changes nothing."""
  libc = _glibc()
  if libc is not None:
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MIN)
  try:
    yield
  finally:
    if libc is not None:
      libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
      libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX)


def return_freed_memory() -> bool:
  """Hands the memory malloc holds freed (a compiler's working memory, say) back to the
  OS (glibc's `malloc_trim`); True if some was. Nothing happens without glibc."""
  libc = _glibc()
  return bool(libc is not None and libc.malloc_trim(0))


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_REEXEC_MARK = "ANKH3_JAX_REEXECUTED"


def huge_pages_available() -> bool:
  """Linux, glibc >= 2.35 (the tunable) and transparent huge pages in 'madvise' mode."""
  if platform.system() != "Linux":
    return False
  libc, version = platform.libc_ver()
  if libc != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
    return False
  try:
    with open(_THP_MODE_FILE, encoding="ascii") as f:
      return "[madvise]" in f.read()  # 'always' needs no advice, 'never' takes none
  except OSError:
    return False


def reexec_with_huge_pages() -> None:
  """Restarts this process with `HUGE_PAGES_TUNABLE` added to GLIBC_TUNABLES.

  Returns without doing anything where `huge_pages_available()` is false, where
  GLIBC_TUNABLES already sets it (the user's choice wins), or after one restart;
  otherwise does not return (`os.execve` keeps the pid, arguments and environment).
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if (os.environ.get(_REEXEC_MARK) or "glibc.malloc.hugetlb" in tunables
      or not huge_pages_available()):
    return
  env = dict(os.environ, **{_REEXEC_MARK: "1", "GLIBC_TUNABLES": ":".join(
      t for t in (tunables, HUGE_PAGES_TUNABLE) if t)})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def prefer_eigen_dots() -> None:
  """Adds `EIGEN_DOTS_XLA_FLAG` to XLA_FLAGS; an error once JAX's backends exist."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  initialized = getattr(xla_bridge, "backends_are_initialized", lambda: False)
  if initialized():
    raise RuntimeError("prefer_eigen_dots() must run before JAX initialises its backends")
  flags = os.environ.get("XLA_FLAGS", "")
  if EIGEN_DOTS_XLA_FLAG not in flags.split():
    os.environ["XLA_FLAGS"] = f"{flags} {EIGEN_DOTS_XLA_FLAG}".strip()


def eigen_dots_flag_known() -> bool:
  """Whether the installed jaxlib is one that accepts `EIGEN_DOTS_XLA_FLAG`."""
  import jaxlib  # pylint: disable=g-import-not-at-top  (does not start a backend)
  return jaxlib.__version__.startswith(EIGEN_DOTS_JAXLIB_RELEASES)


def prefer_eigen_dots_if_known() -> bool:
  """`prefer_eigen_dots()` under a known jaxlib; returns whether the flag is now set.

  Leaves XLA_FLAGS alone (returning False) when the jaxlib is not a known one, or when
  XLA_FLAGS already chooses the YNNPACK fusion kinds (the user's choice wins).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if EIGEN_DOTS_XLA_FLAG in flags.split():
    return True
  if "xla_cpu_experimental_ynn_fusion_type" in flags or not eigen_dots_flag_known():
    return False
  prefer_eigen_dots()
  return True


@functools.lru_cache(maxsize=None)
def eigen_dot_options() -> Optional[dict]:
  """`compiler_options` for `jax.jit` that keep matmuls out of YNNPACK on XLA:CPU.

  None (no options) when the default backend is not the CPU or this jaxlib rejects them.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  if jax.default_backend() != "cpu":
    return None
  try:
    probe = jax.jit(jnp.matmul, compiler_options=EIGEN_DOTS_COMPILER_OPTIONS)
    probe.lower(jnp.ones((2, 2)), jnp.ones((2, 2))).compile()
  except Exception:  # pylint: disable=broad-except
    return None
  return dict(EIGEN_DOTS_COMPILER_OPTIONS)


CPUINFO = "/proc/cpuinfo"
# The CPU kinds whose train steps were measured differently (docs/performance.md has a
# section per kind): the /proc/cpuinfo flag that marks each, most specific first.
CPU_KIND_FLAGS = (("amx", "amx_bf16"), ("avx512", "avx512f"), ("avx2", "avx2"))
# Matmul setting of train steps per CPU kind: 'eigen' (`prefer_eigen_dots`) or
# 'xla_default' (YNNPACK). avx2: +11-30% at `small` on the 2-core EPYC. avx512: on two
# 2-core Xeons (Cascade Lake; Emerald Rapids with bf16/AMX hidden: +8-18% at `small`,
# +2-6% at `tiny`; docs/performance.md). amx: not measured yet, the setting of the
# nearest measured kind.
TRAIN_DOTS_BY_KIND = {"avx2": "eigen", "avx512": "eigen", "amx": "eigen", "other": "eigen"}
# Whether float32 products take numpy's OpenBLAS sgemm (`cpu_kernels.blas_matmul`) per
# CPU kind. avx2: +3-25% `tiny` train steps and +5-24% `ankh3_large` embedding on the
# 2-core EPYC (Zen 3), `small` unchanged. avx512: no gain in the step on the 2-core Xeon
# (its products overlap less than XLA's own). amx and other: not measured (other has no
# kernels). `ANKH3_JAX_BLAS=1`/`0` overrides (docs/performance.md).
BLAS_PRODUCTS_BY_KIND = {"avx2": True, "avx512": False, "amx": False, "other": False}
BLAS_ENV_SWITCH = "ANKH3_JAX_BLAS"


def cpu_flags(cpuinfo_path: str = CPUINFO) -> frozenset:
  """The first processor's flags in `cpuinfo_path` (empty where it cannot be read)."""
  try:
    with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
      for line in f:
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
          return frozenset(value.split())
  except OSError:
    pass
  return frozenset()


def cpu_kind(flags: Collection[str]) -> str:
  """'amx', 'avx512', 'avx2' or 'other': the first of `CPU_KIND_FLAGS` that `flags` has."""
  return next((kind for kind, flag in CPU_KIND_FLAGS if flag in flags), "other")


def train_dots_for(flags: Collection[str]) -> str:
  """The train steps' matmul setting ('eigen' or 'xla_default') for these CPU flags."""
  return TRAIN_DOTS_BY_KIND[cpu_kind(flags)]


def blas_products_for(flags: Collection[str]) -> bool:
  """Whether float32 products take the sgemm route on a CPU with these flags."""
  return BLAS_PRODUCTS_BY_KIND[cpu_kind(flags)]


def blas_products_chosen(cpuinfo_path: str = CPUINFO) -> bool:
  """`BLAS_ENV_SWITCH` '1' or '0' where set, else `blas_products_for` this machine."""
  setting = os.environ.get(BLAS_ENV_SWITCH, "auto")
  if setting in ("0", "1"):
    return setting == "1"
  if setting != "auto":
    raise ValueError(f"{BLAS_ENV_SWITCH}={setting!r}: use 1, 0 or auto")
  return blas_products_for(cpu_flags(cpuinfo_path))


def apply_train_dots_for_this_cpu(cpuinfo_path: str = CPUINFO) -> Optional[str]:
  """Applies `train_dots_for` this machine's flags; returns the setting now in effect.

  'eigen' once the flag is set (under a known jaxlib, unless XLA_FLAGS chose the YNNPACK
  kinds itself), 'xla_default' when XLA keeps its own choice.
  """
  if train_dots_for(cpu_flags(cpuinfo_path)) == "eigen" and prefer_eigen_dots_if_known():
    return "eigen"
  return "xla_default"
