// ankh3_jax: an XLA:CPU custom call for float32 matrix products through a BLAS sgemm.
//
// c = op(a) @ op(b), op transposing where `trans_a` / `trans_b` say, row-major. XLA:CPU's
// own products (Eigen, YNNPACK) reach 0.6-0.9x of an optimised BLAS on the shapes of a
// training step, least on kernel gradients (x^T dy, contracting the tokens) and at small
// sizes (docs/performance.md). The sgemm is not linked: cpu_kernels.py hands over the
// address of the one numpy ships (OpenBLAS, 64-bit integers) before the first call.
#include <algorithm>
#include <cstdint>
#include <memory>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using F32Batch = ffi::Buffer<ffi::F32, 3>;  // [batch, rows, columns]

// cblas_sgemm with 64-bit integers (OpenBLAS's ILP64 interface).
using Sgemm = void (*)(int layout, int trans_a, int trans_b, int64_t m, int64_t n,
                       int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                       int64_t ldb, float beta, float* c, int64_t ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
using SetThreadsLocal = void (*)(int threads);
static Sgemm sgemm = nullptr;
static SetThreadsLocal set_threads_local = nullptr;

// `threads_local`: OpenBLAS's openblas_set_num_threads_local, or null.
extern "C" void Ankh3SetSgemm(void* fn, void* threads_local) {
  sgemm = reinterpret_cast<Sgemm>(fn);
  set_threads_local = reinterpret_cast<SetThreadsLocal>(threads_local);
}

// c[i] = op(a[i]) @ op(b[i]) for each of `batch` matrices, each cut into `blocks` blocks of
// rows (or of columns, where the output has more of those); `parts` tasks on XLA:CPU's
// own pool share the batch x blocks units, each unit one sgemm on a single thread:
// OpenBLAS's threads beside XLA's would compete for the same cores and spin after each
// call, slowing XLA's own work between products. Fixed blocks keep results reproducible.
struct Product {
  const float* a; const float* b; float* c;
  int64_t batch, m, n, k, lda, ldb;
  bool trans_a, trans_b, split_rows;
  int64_t blocks, parts;

  void Unit(int64_t u) const {
    const int64_t i = u / blocks, block = u % blocks;
    const int64_t total = split_rows ? m : n;
    const int64_t lo = total * block / blocks, hi = total * (block + 1) / blocks;
    if (hi == lo) return;
    const float* ap = a + i * m * k;
    const float* bp = b + i * k * n;
    float* cp = c + i * m * n;
    int64_t rows = m, cols = n;
    if (split_rows) {
      ap += trans_a ? lo : lo * lda;
      cp += lo * n;
      rows = hi - lo;
    } else {
      bp += trans_b ? lo * ldb : lo;
      cp += lo;
      cols = hi - lo;
    }
    sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, rows, cols,
          k, 1.0f, ap, lda, bp, ldb, 0.0f, cp, n);
  }

  void Part(int64_t p) const {
    if (set_threads_local != nullptr) set_threads_local(1);
    const int64_t units = batch * blocks;
    for (int64_t u = units * p / parts; u < units * (p + 1) / parts; ++u) Unit(u);
  }
};

static ffi::Future Failed(ffi::Error error) {
  ffi::Promise promise;
  promise.SetError(std::move(error));
  return ffi::Future(promise);
}

// Asynchronous, as XLA:CPU's own dots: the blocks are queued on XLA's pool and the call
// returns at once, so the executor runs independent operations meanwhile instead of a
// thread waiting for the product.
static ffi::Future Impl(ffi::ThreadPool pool, F32Batch a, F32Batch b, ffi::Result<F32Batch> c,
                        bool trans_a, bool trans_b) {
  if (sgemm == nullptr) return Failed(ffi::Error::Internal("ankh3 BlasProduct: no sgemm set"));
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const int64_t batch = ad[0];
  const int64_t m = trans_a ? ad[2] : ad[1], k = trans_a ? ad[1] : ad[2];
  const int64_t n = trans_b ? bd[1] : bd[2];
  if (bd[0] != batch || (trans_b ? bd[2] : bd[1]) != k || cd[0] != batch || cd[1] != m ||
      cd[2] != n)
    return Failed(ffi::Error::InvalidArgument("ankh3 BlasProduct: operand shapes disagree"));
  ffi::Promise done;
  ffi::Future future(done);
  if (batch == 0 || m == 0 || n == 0 || k == 0) {
    for (int64_t i = 0; i < batch * m * n; ++i) c->typed_data()[i] = 0.0f;
    done.SetAvailable();
    return future;
  }
  auto work = std::make_shared<Product>();
  work->a = a.typed_data(); work->b = b.typed_data(); work->c = c->typed_data();
  work->batch = batch; work->m = m; work->n = n; work->k = k;
  work->lda = ad[2]; work->ldb = bd[2];
  work->trans_a = trans_a; work->trans_b = trans_b; work->split_rows = m >= n;
  const int64_t want = pool.num_threads();
  // Blocks of at least 64 rows or columns: smaller ones cost more in calls than they gain.
  work->blocks = std::max<int64_t>(1, std::min<int64_t>((want + batch - 1) / batch,
                                                        std::max(m, n) / 64));
  work->parts = std::min<int64_t>(want, batch * work->blocks);
  ffi::CountDownPromise count(done, work->parts);
  for (int64_t p = 0; p < work->parts; ++p)
    pool.Schedule([work, count, p]() mutable {
      work->Part(p);
      count.CountDown();
    });
  return future;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlasProduct, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Batch>()
                                  .Arg<F32Batch>()
                                  .Ret<F32Batch>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
