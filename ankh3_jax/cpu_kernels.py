"""Native XLA:CPU kernels, built on the user's machine at first use.

`bf16_rows_product(kernel, rows)`: a bfloat16 kernel held [out, in] times a few float32
rows, in float32, as one XLA FFI custom call (`csrc/bf16_rows_product.cc`). Decode steps
with bfloat16 weights use it (`layers.Dense`): XLA:CPU widens each kernel into a float32
temporary first, which at the released sizes made a step 3x slower than with float32
weights; the kernel widens in registers as the weights stream (docs/performance.md).

The library is compiled once per machine with the system's C++ compiler (`$CXX`, else
`c++`; `-march=native`) against the FFI headers jaxlib ships, into
`$ANKH3_JAX_CACHE_DIR` (default `~/.cache/ankh3_jax`)/cpu_kernels, keyed by the source,
jaxlib's version and the CPU. Where it cannot be built (no compiler, a CPU without AVX2
and FMA, a compile error) or `ANKH3_JAX_CPU_KERNELS=0` is set, `available()` is False
and the library computes as before, in plain XLA.
"""
import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "bf16_rows_product.cc")
TARGET = "ankh3_bf16_rows_product"
ENV_SWITCH = "ANKH3_JAX_CPU_KERNELS"
BUILD_TIMEOUT_S = 300
# Rows up to which `bf16_rows_product` beat XLA's widening at a [3840, 1536] kernel
# (1.0 against 4.8 ms at 2 rows, 10 against 16 ms at 32; it computes ~0.3 ms a row beyond
# 8, where XLA's matmul takes over). `layers.Dense` uses it up to this.
MAX_ROWS = 32

log = logging.getLogger(__name__)


def cache_dir() -> str:
  base = os.environ.get("ANKH3_JAX_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ankh3_jax")
  return os.path.join(base, "cpu_kernels")


def _cpu_signature() -> str:
  """The CPU's model and flags (a library built with -march=native runs only there)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      lines = [l for l in f if l.startswith(("model name", "flags"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor()


def _compiler() -> Optional[str]:
  return shutil.which(os.environ.get("CXX", "c++"))


def _library_path(compiler: str) -> str:
  with open(SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(b"\0".join([
      source, importlib.metadata.version("jaxlib").encode(), compiler.encode(),
      platform.machine().encode(), _cpu_signature().encode()])).hexdigest()[:16]
  return os.path.join(cache_dir(), f"bf16_rows_product-{key}.so")


def build(compiler: str, path: str, extra_flags: Sequence[str] = ()) -> None:
  """Compiles `SOURCE` into `path` (written whole or not at all); raises on failure.
  `extra_flags` (tests): e.g. '-mno-avx512f' builds the AVX2 path on an AVX-512 CPU."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".so.tmp")
  os.close(fd)
  try:
    cmd = [compiler, "-O3", "-march=native", *extra_flags, "-std=c++17", "-shared",
           "-fPIC", "-w", "-I", jax.ffi.include_dir(), SOURCE, "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                          check=False)
    if done.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: "
                         f"{done.stderr.strip()[-2000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def register(path: str, target: str) -> None:
  """Loads a built library and registers its handler with XLA:CPU as `target`."""
  library = ctypes.cdll.LoadLibrary(path)
  jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(library.Bf16RowsProduct),
                              platform="cpu")


@functools.cache
def available() -> bool:
  """True once the kernels are built, loaded and registered with XLA:CPU (first call
  builds them: ~5 s); False, with the reason logged once, where they cannot be."""
  if os.environ.get(ENV_SWITCH, "1") == "0":
    return False
  if jax.default_backend() != "cpu":
    return False
  compiler = _compiler()
  if compiler is None:
    log.warning("no C++ compiler (%s): bfloat16 decode steps widen their weights in "
                "XLA (slower)", os.environ.get("CXX", "c++"))
    return False
  try:
    path = _library_path(compiler)
    if not os.path.exists(path):
      log.info("building the native CPU kernels once for this machine (~5 s): %s", path)
      build(compiler, path)
    register(path, TARGET)
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    log.warning("native CPU kernels unavailable, bfloat16 decode steps widen their "
                "weights in XLA (slower): %s", e)
    return False
  return True


@jax.custom_jvp
def bf16_rows_product(kernel: jax.Array, rows: jax.Array) -> jax.Array:
  """rows @ kernel^T in float32 for a bfloat16 kernel [out, in] and float32 rows [r, in]:
  [r, out]. Needs `available()`. Differentiable (the tangents are computed in XLA)."""
  if kernel.dtype != jnp.bfloat16 or rows.dtype != jnp.float32 or kernel.ndim != 2 or (
      rows.ndim != 2 or rows.shape[1] != kernel.shape[1]):
    raise ValueError(f"bf16_rows_product takes a bfloat16 [out, in] kernel and float32 "
                     f"[rows, in] rows, not {kernel.dtype}{list(kernel.shape)} and "
                     f"{rows.dtype}{list(rows.shape)}")
  return product_call(kernel, rows, TARGET)


def product_call(kernel: jax.Array, rows: jax.Array, target: str) -> jax.Array:
  """The custom call itself, to the handler registered as `target`."""
  out = jax.ShapeDtypeStruct((rows.shape[0], kernel.shape[0]), jnp.float32)
  return jax.ffi.ffi_call(target, out)(kernel, rows)


@bf16_rows_product.defjvp
def _bf16_rows_product_jvp(primals, tangents):
  kernel, rows = primals
  d_kernel, d_rows = tangents
  tangent = (jnp.dot(rows, d_kernel.astype(jnp.float32).T)
             + jnp.dot(d_rows, kernel.astype(jnp.float32).T))
  return bf16_rows_product(kernel, rows), tangent
