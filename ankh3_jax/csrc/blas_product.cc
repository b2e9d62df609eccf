// ankh3_jax: an XLA:CPU custom call for float32 matrix products through a BLAS sgemm.
//
// c = op(a) @ op(b), op transposing where `trans_a` / `trans_b` say, row-major. XLA:CPU's
// own products (Eigen, YNNPACK) reach 0.6-0.9x of an optimised BLAS on the shapes of a
// training step, least on kernel gradients (x^T dy, contracting the tokens) and at small
// sizes (docs/performance.md). On the same sgemm, the attention's forward and backward
// run as one call each, with every head's [q, k] block in cache. The sgemm is not
// linked: cpu_kernels.py hands over the address of the one numpy ships (OpenBLAS, 64-bit
// integers) before the first call.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using F32Heads = ffi::Buffer<ffi::F32, 4>;  // see Matrices

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

// Where the products' time goes inside a program (benchmarks/step_profile.py): while
// counting is on, each sgemm call's thread time is added to its shape's row. Off by
// default; then a unit costs one relaxed atomic load more.
static std::atomic<bool> counting{false};
static std::mutex counts_mutex;
// Rows of kCountFields: m, n, k, trans_a, trans_b, batch (the product's shape; for the
// fused attention backward q, k, d, -1, -1, B x H, for the forward -2, -2), then its
// sgemm calls (heads for the backward, (batch, head) blocks for the forward), their
// nanoseconds and their floating-point operations.
constexpr int kCountFields = 9;
static std::vector<int64_t> counts;

static void Count(const int64_t (&shape)[6], int64_t ns, int64_t flops) {
  std::lock_guard<std::mutex> lock(counts_mutex);
  for (size_t row = 0; row < counts.size(); row += kCountFields)
    if (std::equal(shape, shape + 6, counts.begin() + row)) {
      counts[row + 6] += 1;
      counts[row + 7] += ns;
      counts[row + 8] += flops;
      return;
    }
  counts.insert(counts.end(), shape, shape + 6);
  counts.push_back(1);
  counts.push_back(ns);
  counts.push_back(flops);
}

extern "C" void Ankh3CountProducts(int on) { counting = on != 0; }

// Copies up to `capacity` rows into `out`, clears them, and returns how many there were.
extern "C" int64_t Ankh3TakeProductCounts(int64_t* out, int64_t capacity) {
  std::lock_guard<std::mutex> lock(counts_mutex);
  const int64_t rows = counts.size() / kCountFields;
  std::copy(counts.begin(), counts.begin() + std::min(rows, capacity) * kCountFields, out);
  counts.clear();
  return rows;
}

// One operand's matrices, indexed i = batch * heads + head: stacked [B, H, R, C]
// (row-major, one matrix after another) or, `interleaved`, [B, R, H, C] (the heads between
// the rows and the columns, as a projection's output holds them: each matrix is read in
// place with a leading dimension of H * C, so no transposed copy is made for the call).
template <typename T>
struct Matrices {
  T* data;
  int64_t heads, rows, cols, ld, head_step, batch_step;

  Matrices(T* d, ffi::Span<const int64_t> dims, bool interleaved) : data(d) {
    if (interleaved) {
      rows = dims[1]; heads = dims[2]; cols = dims[3];
      ld = heads * cols; head_step = cols; batch_step = rows * heads * cols;
    } else {
      heads = dims[1]; rows = dims[2]; cols = dims[3];
      ld = cols; head_step = rows * cols; batch_step = heads * rows * cols;
    }
  }
  T* At(int64_t i) const { return data + (i / heads) * batch_step + (i % heads) * head_step; }
};

// c[i] = op(a[i]) @ op(b[i]) for each of `batch` matrices, each cut into `blocks` blocks of
// rows (or of columns, where the output has more of those); `parts` tasks on XLA:CPU's
// own pool share the batch x blocks units, each unit one sgemm on a single thread:
// OpenBLAS's threads beside XLA's would compete for the same cores and spin after each
// call, slowing XLA's own work between products. Fixed blocks keep results reproducible.
struct Product {
  Matrices<const float> a, b;
  Matrices<float> c;
  int64_t batch, m, n, k;
  bool trans_a, trans_b, split_rows;
  int64_t blocks, parts;

  void Unit(int64_t u) const {
    const int64_t i = u / blocks, block = u % blocks;
    const int64_t total = split_rows ? m : n;
    const int64_t lo = total * block / blocks, hi = total * (block + 1) / blocks;
    if (hi == lo) return;
    const float* ap = a.At(i);
    const float* bp = b.At(i);
    float* cp = c.At(i);
    int64_t rows = m, cols = n;
    if (split_rows) {
      ap += trans_a ? lo : lo * a.ld;
      cp += lo * c.ld;
      rows = hi - lo;
    } else {
      bp += trans_b ? lo * b.ld : lo;
      cp += lo;
      cols = hi - lo;
    }
    const bool count = counting.load(std::memory_order_relaxed);
    const auto start = count ? std::chrono::steady_clock::now()
                             : std::chrono::steady_clock::time_point();
    sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, rows, cols,
          k, 1.0f, ap, a.ld, bp, b.ld, 0.0f, cp, c.ld);
    if (count)
      Count({m, n, k, trans_a, trans_b, batch},
            std::chrono::duration_cast<std::chrono::nanoseconds>(
                std::chrono::steady_clock::now() - start).count(),
            2 * rows * cols * k);
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

// Runs fn(part) for each of `parts` tasks on XLA:CPU's pool; `done` is set once all have.
template <typename Fn>
static void RunParts(ffi::ThreadPool& pool, int64_t parts, ffi::Promise& done, Fn fn) {
  ffi::CountDownPromise count(done, parts);
  for (int64_t part = 0; part < parts; ++part)
    pool.Schedule([fn, count, part]() mutable {
      fn(part);
      count.CountDown();
    });
}

// Asynchronous, as XLA:CPU's own dots: the blocks are queued on XLA's pool and the call
// returns at once, so the executor runs independent operations meanwhile instead of a
// thread waiting for the product.
static ffi::Future Impl(ffi::ThreadPool pool, F32Heads a, F32Heads b, ffi::Result<F32Heads> c,
                        bool trans_a, bool trans_b, bool a_interleaved, bool b_interleaved,
                        bool c_interleaved) {
  if (sgemm == nullptr) return Failed(ffi::Error::Internal("ankh3 BlasProduct: no sgemm set"));
  Matrices<const float> am(a.typed_data(), a.dimensions(), a_interleaved);
  Matrices<const float> bm(b.typed_data(), b.dimensions(), b_interleaved);
  Matrices<float> cm(c->typed_data(), c->dimensions(), c_interleaved);
  const int64_t batch = a.dimensions()[0] * am.heads;
  const int64_t m = trans_a ? am.cols : am.rows, k = trans_a ? am.rows : am.cols;
  const int64_t n = trans_b ? bm.rows : bm.cols;
  if (b.dimensions()[0] * bm.heads != batch || c->dimensions()[0] * cm.heads != batch ||
      (trans_b ? bm.cols : bm.rows) != k ||
      cm.rows != m || cm.cols != n)
    return Failed(ffi::Error::InvalidArgument("ankh3 BlasProduct: operand shapes disagree"));
  ffi::Promise done;
  ffi::Future future(done);
  if (batch == 0 || m == 0 || n == 0 || k == 0) {
    for (int64_t i = 0; i < batch * m * n; ++i) c->typed_data()[i] = 0.0f;
    done.SetAvailable();
    return future;
  }
  auto work = std::make_shared<Product>(Product{am, bm, cm});
  work->batch = batch; work->m = m; work->n = n; work->k = k;
  work->trans_a = trans_a; work->trans_b = trans_b; work->split_rows = m >= n;
  const int64_t want = pool.num_threads();
  // Blocks of at least 64 rows or columns: smaller ones cost more in calls than they gain.
  work->blocks = std::max<int64_t>(1, std::min<int64_t>((want + batch - 1) / batch,
                                                        std::max(m, n) / 64));
  work->parts = std::min<int64_t>(want, batch * work->blocks);
  RunParts(pool, work->parts, done, [work](int64_t p) { work->Part(p); });
  return future;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(BlasProduct, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Heads>()
                                  .Arg<F32Heads>()
                                  .Ret<F32Heads>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b")
                                  .Attr<bool>("a_interleaved")
                                  .Attr<bool>("b_interleaved")
                                  .Attr<bool>("c_interleaved"));

// The attention's backward for one head over the whole batch, from the saved
// probabilities p [B, H, q, k] and the projections' [B, l, H, d] arrays (as `Matrices`
// with `interleaved`): per (batch, head), with the [q, k] blocks in a cache-resident
// buffer instead of 33 MB arrays written and read back between separate products:
//   d_value = p^T d_out;  d_p = (row_scale * d_out) value^T;
//   d_scores = p * (d_p - rowsum(p * d_p));  d_query = d_scores key;
//   d_key = d_scores^T query;  d_bias[head] = sum over the batch of d_scores.
// row_scale [B, H, q] is 0 for a query row that sees no key (layers.dot_product_attention).
struct AttentionBackward {
  const float* p; const float* row_scale;
  Matrices<const float> d_out, value, query, key;
  Matrices<float> d_query, d_key, d_value;
  float* d_bias;
  int64_t batch, heads, q, k, d;

  void Head(int64_t h) const {
    const bool count = counting.load(std::memory_order_relaxed);
    const auto start = count ? std::chrono::steady_clock::now()
                             : std::chrono::steady_clock::time_point();
    Sums(h);
    if (count)
      Count({q, k, d, -1, -1, batch * heads},
            std::chrono::duration_cast<std::chrono::nanoseconds>(
                std::chrono::steady_clock::now() - start).count(),
            8 * batch * q * k * d);  // its four products
  }

  void Sums(int64_t h) const {
    if (set_threads_local != nullptr) set_threads_local(1);
    thread_local std::vector<float> buffer;
    buffer.resize(q * k);
    float* ds = buffer.data();
    float* bias = d_bias + h * q * k;
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t i = b * heads + h;
      const float* pi = p + i * q * k;
      sgemm(kRowMajor, kTrans, kNoTrans, k, d, q, 1.0f, pi, k, d_out.At(i), d_out.ld, 0.0f,
            d_value.At(i), d_value.ld);
      sgemm(kRowMajor, kNoTrans, kTrans, q, k, d, 1.0f, d_out.At(i), d_out.ld, value.At(i),
            value.ld, 0.0f, ds, k);
      const float* scale = row_scale + i * q;
      for (int64_t r = 0; r < q; ++r) {
        float* row = ds + r * k;
        const float* pr = pi + r * k;
        __m256 acc = _mm256_setzero_ps();
        int64_t c = 0;
        for (; c + 8 <= k; c += 8)
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(pr + c), _mm256_loadu_ps(row + c), acc);
        float lanes[8];
        _mm256_storeu_ps(lanes, acc);
        float dot = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
                    ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
        for (; c < k; ++c) dot += pr[c] * row[c];
        // d_scores = p * s * (d_p - dot), s the row's scale (0 or 1).
        const __m256 s = _mm256_set1_ps(scale[r]), sdot = _mm256_set1_ps(scale[r] * dot);
        for (c = 0; c + 8 <= k; c += 8) {
          const __m256 g = _mm256_fmsub_ps(s, _mm256_loadu_ps(row + c), sdot);
          _mm256_storeu_ps(row + c, _mm256_mul_ps(_mm256_loadu_ps(pr + c), g));
        }
        for (; c < k; ++c) row[c] = pr[c] * (scale[r] * row[c] - scale[r] * dot);
      }
      sgemm(kRowMajor, kNoTrans, kNoTrans, q, d, k, 1.0f, ds, k, key.At(i), key.ld, 0.0f,
            d_query.At(i), d_query.ld);
      sgemm(kRowMajor, kTrans, kNoTrans, k, d, q, 1.0f, ds, k, query.At(i), query.ld, 0.0f,
            d_key.At(i), d_key.ld);
      if (b == 0) {
        std::copy(ds, ds + q * k, bias);
      } else {
        int64_t c = 0;
        for (; c + 8 <= q * k; c += 8)
          _mm256_storeu_ps(bias + c, _mm256_add_ps(_mm256_loadu_ps(bias + c),
                                                   _mm256_loadu_ps(ds + c)));
        for (; c < q * k; ++c) bias[c] += ds[c];
      }
    }
  }
};

using F32Array3 = ffi::Buffer<ffi::F32, 3>;  // row scales [B, H, q], a bias [H, q, k]

static ffi::Future AttentionBackwardImpl(
    ffi::ThreadPool pool, F32Heads p, F32Array3 row_scale,
    F32Heads d_out, F32Heads value, F32Heads query, F32Heads key,
    ffi::Result<F32Heads> d_query, ffi::Result<F32Heads> d_key,
    ffi::Result<F32Heads> d_value, ffi::Result<F32Array3> d_bias) {
  if (sgemm == nullptr)
    return Failed(ffi::Error::Internal("ankh3 AttentionBackward: no sgemm set"));
  auto pd = p.dimensions();
  auto work = std::make_shared<AttentionBackward>(AttentionBackward{
      p.typed_data(), row_scale.typed_data(),
      Matrices<const float>(d_out.typed_data(), d_out.dimensions(), true),
      Matrices<const float>(value.typed_data(), value.dimensions(), true),
      Matrices<const float>(query.typed_data(), query.dimensions(), true),
      Matrices<const float>(key.typed_data(), key.dimensions(), true),
      Matrices<float>(d_query->typed_data(), d_query->dimensions(), true),
      Matrices<float>(d_key->typed_data(), d_key->dimensions(), true),
      Matrices<float>(d_value->typed_data(), d_value->dimensions(), true),
      d_bias->typed_data(), pd[0], pd[1], pd[2], pd[3], d_out.dimensions()[3]});
  const auto& w = *work;
  if (w.d_out.rows != w.q || w.query.rows != w.q || w.key.rows != w.k || w.value.rows != w.k ||
      w.d_out.heads != w.heads || w.key.heads != w.heads || w.value.cols != w.d ||
      w.key.cols != w.d || w.query.cols != w.d || row_scale.dimensions()[2] != w.q ||
      row_scale.dimensions()[0] * row_scale.dimensions()[1] != w.batch * w.heads)
    return Failed(ffi::Error::InvalidArgument("ankh3 AttentionBackward: shapes disagree"));
  ffi::Promise done;
  ffi::Future future(done);
  const int64_t parts = std::min<int64_t>(pool.num_threads(), w.heads);
  if (parts <= 0 || w.batch == 0) {
    done.SetAvailable();
    return future;
  }
  RunParts(pool, parts, done, [work, parts](int64_t part) {
    for (int64_t h = work->heads * part / parts; h < work->heads * (part + 1) / parts; ++h)
      work->Head(h);
  });
  return future;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttentionBackwardHandler, AttentionBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Heads>()
                                  .Arg<F32Array3>()
                                  .Arg<F32Heads>()
                                  .Arg<F32Heads>()
                                  .Arg<F32Heads>()
                                  .Arg<F32Heads>()
                                  .Ret<F32Heads>()
                                  .Ret<F32Heads>()
                                  .Ret<F32Heads>()
                                  .Ret<F32Array3>());

// e^x for x <= 0 (a softmax's shifted scores), 8 at a time: x = n ln2 + r with |r| <= ln2/2,
// e^r by a polynomial, 2^n through the exponent bits. Below -87.33 (2^-126) the result is
// 0, as is e^-inf; relative error ~2e-7 elsewhere. The ln2 split and the polynomial's
// coefficients are the published ones of the Cephes library's expf (S. L. Moshier, netlib).
static inline __m256 ExpNonPositive(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.33654f);
  const __m256 keep = _mm256_cmp_ps(x, lowest, _CMP_GE_OQ);
  x = _mm256_max_ps(x, lowest);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2, ln2 split in two so that n * the high part is exact.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(bits)), keep);
}

// One row of the attention's softmax in place: s = scores + bias, masked entries at the
// float32 minimum (a row that sees no key gets uniform weights, as the XLA path's does),
// then exp(s - max) / sum.
static void SoftmaxRow(float* s, const float* bias, const bool* mask, int64_t k) {
  constexpr float kLowest = -3.40282347e38f;
  const __m256 lowest = _mm256_set1_ps(kLowest);
  __m256 most = lowest;
  int64_t c = 0;
  for (; c + 8 <= k; c += 8) {  // s = scores + bias, masked at the minimum; the max
    __m256 x = _mm256_loadu_ps(s + c);
    if (bias != nullptr) x = _mm256_add_ps(x, _mm256_loadu_ps(bias + c));
    if (mask != nullptr) {
      const __m256i seen = _mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mask + c)));
      x = _mm256_blendv_ps(lowest, x, _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(seen, _mm256_setzero_si256())));
    }
    _mm256_storeu_ps(s + c, x);
    most = _mm256_max_ps(most, x);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, most);
  float top = std::max(std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3])),
                       std::max(std::max(lanes[4], lanes[5]), std::max(lanes[6], lanes[7])));
  for (; c < k; ++c) {
    s[c] = (mask != nullptr && !mask[c]) ? kLowest : s[c] + (bias != nullptr ? bias[c] : 0.0f);
    top = std::max(top, s[c]);
  }
  const __m256 shift = _mm256_set1_ps(top);
  __m256 acc = _mm256_setzero_ps();
  for (c = 0; c + 8 <= k; c += 8) {
    const __m256 e = ExpNonPositive(_mm256_sub_ps(_mm256_loadu_ps(s + c), shift));
    _mm256_storeu_ps(s + c, e);
    acc = _mm256_add_ps(acc, e);
  }
  _mm256_storeu_ps(lanes, acc);
  float sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
              ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  if (c < k) {  // the tail, through the same vector exp
    float tail[8] = {};
    for (int64_t t = c; t < k; ++t) tail[t - c] = s[t] - top;
    _mm256_storeu_ps(tail, ExpNonPositive(_mm256_loadu_ps(tail)));
    for (int64_t t = c; t < k; ++t) sum += (s[t] = tail[t - c]);
  }
  const __m256 total = _mm256_set1_ps(sum);
  for (c = 0; c + 8 <= k; c += 8)
    _mm256_storeu_ps(s + c, _mm256_div_ps(_mm256_loadu_ps(s + c), total));
  for (; c < k; ++c) s[c] /= sum;
}

// The attention's forward per (batch, head): scores = q k^T into a [q, k] block, the
// softmax in place (`SoftmaxRow`), out = p v while the block is in cache. The block is the
// `probs` result where the caller keeps it (for the backward), else a thread's buffer.
struct AttentionForward {
  Matrices<const float> query, key, value;
  Matrices<float> out;
  const float* bias;  // [H, q, k] or null
  const bool* mask;   // [B, q, k] or null
  float* probs;       // [B, H, q, k] or null
  int64_t batch, heads, q, k, d;

  void Unit(int64_t u) const {  // head-major, so a part reuses its heads' bias blocks
    const int64_t h = u / batch, b = u % batch, i = b * heads + h;
    thread_local std::vector<float> buffer;
    float* p = probs;
    if (p == nullptr) {
      buffer.resize(q * k);
      p = buffer.data();
    } else {
      p += i * q * k;
    }
    const bool count = counting.load(std::memory_order_relaxed);
    const auto start = count ? std::chrono::steady_clock::now()
                             : std::chrono::steady_clock::time_point();
    sgemm(kRowMajor, kNoTrans, kTrans, q, k, d, 1.0f, query.At(i), query.ld, key.At(i),
          key.ld, 0.0f, p, k);
    for (int64_t r = 0; r < q; ++r)
      SoftmaxRow(p + r * k, bias == nullptr ? nullptr : bias + (h * q + r) * k,
                 mask == nullptr ? nullptr : mask + (b * q + r) * k, k);
    sgemm(kRowMajor, kNoTrans, kNoTrans, q, d, k, 1.0f, p, k, value.At(i), value.ld, 0.0f,
          out.At(i), out.ld);
    if (count)
      Count({q, k, d, -2, -2, batch * heads},
            std::chrono::duration_cast<std::chrono::nanoseconds>(
                std::chrono::steady_clock::now() - start).count(),
            4 * q * k * d);
  }
};

using Mask3 = ffi::Buffer<ffi::PRED, 3>;

static ffi::Future AttentionForwardImpl(ffi::ThreadPool pool, F32Heads query, F32Heads key,
                                        F32Heads value, F32Array3 bias, Mask3 mask,
                                        ffi::Result<F32Heads> out,
                                        ffi::Result<F32Heads> probs) {
  if (sgemm == nullptr)
    return Failed(ffi::Error::Internal("ankh3 AttentionForward: no sgemm set"));
  auto work = std::make_shared<AttentionForward>(AttentionForward{
      Matrices<const float>(query.typed_data(), query.dimensions(), true),
      Matrices<const float>(key.typed_data(), key.dimensions(), true),
      Matrices<const float>(value.typed_data(), value.dimensions(), true),
      Matrices<float>(out->typed_data(), out->dimensions(), true),
      bias.element_count() ? bias.typed_data() : nullptr,
      mask.element_count() ? mask.typed_data() : nullptr,
      probs->element_count() ? probs->typed_data() : nullptr});
  auto& w = *work;
  w.batch = query.dimensions()[0]; w.heads = w.query.heads; w.q = w.query.rows;
  w.k = w.key.rows; w.d = w.query.cols;
  auto is = [](ffi::Span<const int64_t> dims, std::initializer_list<int64_t> want) {
    return std::equal(dims.begin(), dims.end(), want.begin(), want.end());
  };
  if (!is(key.dimensions(), {w.batch, w.k, w.heads, w.d}) ||
      !is(value.dimensions(), {w.batch, w.k, w.heads, w.d}) ||
      !is(out->dimensions(), {w.batch, w.q, w.heads, w.d}) ||
      (w.bias != nullptr && !is(bias.dimensions(), {w.heads, w.q, w.k})) ||
      (w.mask != nullptr && !is(mask.dimensions(), {w.batch, w.q, w.k})) ||
      (w.probs != nullptr && !is(probs->dimensions(), {w.batch, w.heads, w.q, w.k})))
    return Failed(ffi::Error::InvalidArgument("ankh3 AttentionForward: shapes disagree"));
  ffi::Promise done;
  ffi::Future future(done);
  const int64_t units = w.batch * w.heads;
  const int64_t parts = std::min<int64_t>(pool.num_threads(), units);
  if (parts <= 0 || w.q == 0) {
    done.SetAvailable();
    return future;
  }
  RunParts(pool, parts, done, [work, units, parts](int64_t part) {
    if (set_threads_local != nullptr) set_threads_local(1);
    for (int64_t u = units * part / parts; u < units * (part + 1) / parts; ++u)
      work->Unit(u);
  });
  return future;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttentionForwardHandler, AttentionForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Heads>()
                                  .Arg<F32Heads>()
                                  .Arg<F32Heads>()
                                  .Arg<F32Array3>()
                                  .Arg<Mask3>()
                                  .Ret<F32Heads>()
                                  .Ret<F32Heads>());
