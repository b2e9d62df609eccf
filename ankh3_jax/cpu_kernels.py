"""Native XLA:CPU kernels, built on the user's machine at first use.

- `bf16_rows_product(kernel, rows)`: a bfloat16 kernel held [out, in] times a few float32
  rows, in float32, as one XLA FFI custom call (`csrc/bf16_rows_product.cc`). Decode steps
  with bfloat16 weights use it (`layers.Dense`): XLA:CPU widens each kernel into a float32
  temporary first, which at the released sizes made a step 3x slower than with float32
  weights; the kernel widens in registers as the weights stream (docs/performance.md).
- `blas_matmul(x, kernel)`: x @ kernel in float32 through the sgemm of the OpenBLAS numpy
  ships (`csrc/blas_product.cc`), forward and backward; `blas_product` the batched form.
  `layers.Dense` and `layers.dot_product_attention` use them for float32 products on one
  CPU device: XLA:CPU's own products reach 0.15-0.9x of the sgemm on a training step's
  shapes, the attention's skinny ones and kernel gradients least (docs/performance.md).

The library is compiled once per machine with the system's C++ compiler (`$CXX`, else
`c++`; `-march=native`) against the FFI headers jaxlib ships, into
`$ANKH3_JAX_CACHE_DIR` (default `~/.cache/ankh3_jax`)/cpu_kernels, keyed by the sources,
jaxlib's version and the CPU. Where it cannot be built (no compiler, a CPU without AVX2
and FMA, a compile error) or `ANKH3_JAX_CPU_KERNELS=0` is set, `available()` is False
and the library computes as before, in plain XLA. `blas_matmul` serves where
`blas_available()`: chosen (`cpu_tuning.blas_products_chosen`: AVX2 CPUs, or
`ANKH3_JAX_BLAS=1`; `0` turns it off) and numpy ships its OpenBLAS.
"""
import contextlib
import ctypes
import functools
import glob
import hashlib
import importlib.metadata
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ankh3_jax import cpu_tuning

SOURCES = tuple(os.path.join(os.path.dirname(__file__), "csrc", name)
                for name in ("bf16_rows_product.cc", "blas_product.cc"))
TARGET = "ankh3_bf16_rows_product"
BLAS_TARGET = "ankh3_blas_product"
ATTENTION_BACKWARD_TARGET = "ankh3_attention_backward"
ATTENTION_FORWARD_TARGET = "ankh3_attention_forward"
ENV_SWITCH = "ANKH3_JAX_CPU_KERNELS"
BUILD_TIMEOUT_S = 300
# Rows up to which `bf16_rows_product` beat XLA's widening at a [3840, 1536] kernel
# (1.0 against 4.8 ms at 2 rows, 10 against 16 ms at 32; it computes ~0.3 ms a row beyond
# 8, where XLA's matmul takes over). `layers.Dense` uses it up to this.
MAX_ROWS = 32
# Rows from which `layers.Dense` takes the sgemm route: decode steps' few rows stay in
# XLA's products, whose call costs less (`complete_b1` 950-990 against 1,540-1,570
# tokens/s through the sgemm on the 2-core EPYC).
BLAS_MIN_ROWS = 64

log = logging.getLogger(__name__)
_WITHOUT = ("bfloat16 decode steps widen their weights and float32 products stay in XLA "
            "(slower)")
_library: Optional[ctypes.CDLL] = None  # the loaded kernels, once `available()`


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
  sources = []
  for source in SOURCES:
    with open(source, "rb") as f:
      sources.append(f.read())
  key = hashlib.sha256(b"\0".join([
      *sources, importlib.metadata.version("jaxlib").encode(), compiler.encode(),
      platform.machine().encode(), _cpu_signature().encode()])).hexdigest()[:16]
  return os.path.join(cache_dir(), f"ankh3_cpu_kernels-{key}.so")


def build(compiler: str, path: str, extra_flags: Sequence[str] = ()) -> None:
  """Compiles `SOURCES` into `path` (written whole or not at all); raises on failure.
  `extra_flags` (tests): e.g. '-mno-avx512f' builds the AVX2 path on an AVX-512 CPU."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".so.tmp")
  os.close(fd)
  try:
    cmd = [compiler, "-O3", "-march=native", *extra_flags, "-std=c++17", "-shared",
           "-fPIC", "-w", "-I", jax.ffi.include_dir(), *SOURCES, "-o",
           tmp]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                          check=False)
    if done.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: "
                         f"{done.stderr.strip()[-2000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def register(path: str, target: str, handler: str = "Bf16RowsProduct") -> ctypes.CDLL:
  """Loads a built library and registers its `handler` with XLA:CPU as `target`."""
  library = ctypes.cdll.LoadLibrary(path)
  jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, handler)),
                              platform="cpu")
  return library


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
    log.warning("no C++ compiler (%s): native CPU kernels unavailable, %s",
                os.environ.get("CXX", "c++"), _WITHOUT)
    return False
  try:
    path = _library_path(compiler)
    if not os.path.exists(path):
      log.info("building the native CPU kernels once for this machine (~5 s): %s", path)
      build(compiler, path)
    global _library
    _library = register(path, TARGET)
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    log.warning("native CPU kernels unavailable, %s: %s", _WITHOUT, e)
    return False
  return True


def _numpy_sgemm() -> Optional[tuple[int, Optional[int]]]:
  """Addresses of cblas_sgemm with 64-bit integers in the OpenBLAS numpy's wheel carries
  (numpy >= 2: scipy-openblas64) and of its openblas_set_num_threads_local (None where
  missing), or None where numpy has no such library."""
  root = os.path.dirname(np.__file__)
  for path in sorted(glob.glob(os.path.join(root + ".libs", "*openblas*"))
                     + glob.glob(os.path.join(root, ".dylibs", "*openblas*"))):
    try:
      library = ctypes.CDLL(path)
      sgemm = ctypes.cast(library.scipy_cblas_sgemm64_, ctypes.c_void_p).value
    except (OSError, AttributeError):
      continue
    threads = getattr(library, "openblas_set_num_threads_local", None)
    return sgemm, threads and ctypes.cast(threads, ctypes.c_void_p).value
  return None


@functools.cache
def blas_ready() -> bool:
  """True once `blas_product` can run: the kernels are `available()` and numpy's OpenBLAS
  sgemm is handed to them; False (logged once) otherwise."""
  if not available():
    return False
  addresses = _numpy_sgemm()
  if addresses is None:
    log.info("numpy carries no OpenBLAS sgemm: float32 products stay XLA's")
    return False
  _library.Ankh3SetSgemm(*(ctypes.c_void_p(a) for a in addresses))
  jax.ffi.register_ffi_target(BLAS_TARGET, jax.ffi.pycapsule(_library.BlasProduct),
                              platform="cpu")
  jax.ffi.register_ffi_target(ATTENTION_BACKWARD_TARGET,
                              jax.ffi.pycapsule(_library.AttentionBackwardHandler),
                              platform="cpu")
  jax.ffi.register_ffi_target(ATTENTION_FORWARD_TARGET,
                              jax.ffi.pycapsule(_library.AttentionForwardHandler),
                              platform="cpu")
  return True


@functools.cache
def blas_available() -> bool:
  """True where the sgemm route is both chosen and ready (decided once a process)."""
  return cpu_tuning.blas_products_chosen() and blas_ready()


def blas_product(a: jax.Array, b: jax.Array, trans_a: bool = False,
                 trans_b: bool = False,
                 interleaved: tuple[bool, bool, bool] = (False, False, False)) -> jax.Array:
  """op(a) @ op(b) for float32 matrices over their last two axes, the leading axes a batch
  (the same on both), `op` transposing where asked, as the custom call. Needs
  `blas_available()`.

  `interleaved` (a, b, result): that array is [B, rows, H, columns], its matrices taken
  over axes 1 and 3 for each (B, H) pair, as a projection's [batch, length, heads, d_kv]
  output holds them; the others' leading axes are then that [B, H]. The sgemm reads and
  writes such arrays in place, where a transposed [B, H, rows, columns] operand would be a
  copy of its own before and after the call.
  """
  lead = [_lead(x, inter) for x, inter in zip((a, b), interleaved[:2])]
  if lead[0] != lead[1] or (interleaved[2] and len(lead[0]) != 2):
    raise ValueError(f"blas_product: batches {lead[0]} and {lead[1]} (interleaved "
                     f"{interleaved}) do not agree")
  m = a.shape[-1] if trans_a else _rows(a, interleaved[0])
  n = _rows(b, interleaved[1]) if trans_b else b.shape[-1]
  batch = math.prod(lead[0])
  as4 = lambda x, inter: x if inter else x.reshape((1, batch) + x.shape[-2:])
  shape = (lead[0][0], m, lead[0][1], n) if interleaved[2] else (1, batch, m, n)
  c = jax.ffi.ffi_call(BLAS_TARGET, jax.ShapeDtypeStruct(shape, jnp.float32),
                       vmap_method="sequential")(
      as4(a, interleaved[0]), as4(b, interleaved[1]), trans_a=trans_a, trans_b=trans_b,
      a_interleaved=interleaved[0], b_interleaved=interleaved[1],
      c_interleaved=interleaved[2])
  return c if interleaved[2] else c.reshape(tuple(lead[0]) + (m, n))


def _lead(x: jax.Array, interleaved: bool) -> tuple:
  if interleaved and x.ndim != 4:
    raise ValueError(f"an interleaved operand is [B, rows, H, columns], not {list(x.shape)}")
  return (x.shape[0], x.shape[2]) if interleaved else tuple(x.shape[:-2])


def _rows(x: jax.Array, interleaved: bool) -> int:
  return x.shape[1] if interleaved else x.shape[-2]


@contextlib.contextmanager
def counting_products():
  """Within: each sgemm call of `blas_product` adds its thread time to its product's shape.
  Yields a list that is filled on leaving, one dict per shape (`m`, `n`, `k`,
  `trans_a`, `trans_b` (1 or 0), `batch`; `calls`, `seconds` of thread time, `flops`),
  for profiles (benchmarks/step_profile.py); the fused attention backward counts as
  q, k, d, -1, -1, B x H, its calls the heads, and the fused forward as q, k, d, -2, -2,
  B x H, its calls the (batch, head) blocks. Needs `blas_ready()`."""
  if not blas_ready():
    raise RuntimeError("counting_products needs the sgemm route (blas_ready() is False)")
  rows = []
  _library.Ankh3TakeProductCounts.restype = ctypes.c_int64
  _library.Ankh3TakeProductCounts(None, 0)  # drops what calls outside a window left
  _library.Ankh3CountProducts(1)
  try:
    yield rows
  finally:
    _library.Ankh3CountProducts(0)
    fields, capacity = 9, 4096
    buffer = (ctypes.c_int64 * (fields * capacity))()
    n = _library.Ankh3TakeProductCounts(buffer, capacity)
    if n > capacity:
      log.warning("counting_products: %d product shapes, only %d kept", n, capacity)
    for i in range(min(n, capacity)):
      m, cols, k, trans_a, trans_b, batch, calls, ns, flops = buffer[i * fields:(i + 1) * fields]
      rows.append(dict(m=m, n=cols, k=k, trans_a=trans_a, trans_b=trans_b, batch=batch,
                       calls=calls, seconds=ns / 1e9, flops=flops))


def attention_backward(probs: jax.Array, row_scale: jax.Array, d_out: jax.Array,
                       value: jax.Array, query: jax.Array, key: jax.Array) -> tuple:
  """The attention's gradients in one custom call, head by head, each [q, k] block in a
  cache-resident buffer (`csrc/blas_product.cc`, `AttentionBackward`).

  probs [B, H, q, k] (the softmax, no dropout); row_scale [B, H, q] (0 for a query row
  that sees no key, else 1); d_out, query [B, q, H, d] and value, key [B, k, H, d] (the
  projections' layout). Returns d_query, d_key, d_value in those layouts and d_bias
  [H, q, k] (the score gradients summed over the batch). Needs `blas_available()`.
  """
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  outs = (f32(query.shape), f32(key.shape), f32(value.shape), f32(probs.shape[1:]))
  return jax.ffi.ffi_call(ATTENTION_BACKWARD_TARGET, outs, vmap_method="sequential")(
      probs, row_scale, d_out, value, query, key)


def attention_forward(query: jax.Array, key: jax.Array, value: jax.Array,
                      bias: Optional[jax.Array], mask: Optional[jax.Array],
                      with_probs: bool) -> tuple:
  """softmax(q k^T + bias, masked) v in one custom call, per (batch, head) with the [q, k]
  block in cache (`csrc/blas_product.cc`, `AttentionForward`).

  query [B, q, H, d] and key, value [B, k, H, d] (the projections' layout); bias [H, q, k]
  or None; mask: boolean [B, q, k] (True where a query sees a key; a row that sees none
  gets uniform weights) or None. Returns out [B, q, H, d] and, `with_probs`, the softmax
  [B, H, q, k] (for `attention_backward`), else None. Needs `blas_available()`.
  """
  b, q, h, d = query.shape
  k = key.shape[1]
  outs = (jax.ShapeDtypeStruct((b, q, h, d), jnp.float32),
          jax.ShapeDtypeStruct((b, h, q, k) if with_probs else (0, 0, 0, 0), jnp.float32))
  none = lambda dtype: jnp.zeros((0, 0, 0), dtype)
  out, probs = jax.ffi.ffi_call(ATTENTION_FORWARD_TARGET, outs, vmap_method="sequential")(
      query, key, value, none(jnp.float32) if bias is None else bias,
      none(jnp.bool_) if mask is None else mask)
  return out, probs if with_probs else None


_xla_only = threading.local()


@contextlib.contextmanager
def xla_products():
  """Within (this thread's traces): every product stays XLA's own dot. For XLA's FLOP
  count of a program, which counts nothing for a custom call (benchmarks' MFU)."""
  before = getattr(_xla_only, "on", False)
  _xla_only.on = True
  try:
    yield
  finally:
    _xla_only.on = before


def use_blas(rows: int, *operands: jax.Array) -> bool:
  """Whether `blas_product` / `blas_matmul` serve a product of these with `rows` rows:
  at least `BLAS_MIN_ROWS`, float32 operands, and one device (the custom call has no
  partitioning rule; sharded runs keep XLA's products), outside `xla_products`."""
  return (rows >= BLAS_MIN_ROWS and all(x.dtype == jnp.float32 for x in operands)
          and jax.device_count() == 1 and not getattr(_xla_only, "on", False)
          and blas_available())


@jax.custom_vjp
def blas_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [rows, in] @ kernel [in, out] in float32 through sgemm; the gradients too
  (dy @ kernel^T and x^T @ dy, transposed in the sgemm, not copied)."""
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32 or x.ndim != 2 or (
      kernel.ndim != 2 or x.shape[1] != kernel.shape[0]):
    raise ValueError(f"blas_matmul takes float32 [rows, in] and [in, out] matrices, not "
                     f"{x.dtype}{list(x.shape)} and {kernel.dtype}{list(kernel.shape)}")
  return blas_product(x, kernel)


def _blas_matmul_fwd(x, kernel):
  return blas_matmul(x, kernel), (x, kernel)


def _blas_matmul_bwd(residuals, dy):
  x, kernel = residuals
  dy = dy.astype(jnp.float32)
  return blas_product(dy, kernel, trans_b=True), blas_product(x, dy, trans_a=True)


blas_matmul.defvjp(_blas_matmul_fwd, _blas_matmul_bwd)


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
