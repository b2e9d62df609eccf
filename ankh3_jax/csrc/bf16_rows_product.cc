// ankh3_jax: an XLA:CPU custom call for decode steps with bfloat16 weights.
//
// y[q, o] = sum_i float(w[o, i]) * x[q, i]: a bfloat16 kernel held [out, in] times a few
// float32 rows, computed in float32 (a bfloat16 is the top half of its float32, so the
// widening is exact). XLA:CPU widens the whole kernel into a float32 temporary first, at
// about 1.5 G elements/s on this project's 2-vCPU Xeon: 4.4-5 ms for a [3840, 1536] kernel
// against 1.3 ms to read the same kernel in float32. Widening in registers as the kernel
// streams, this reads it in 1.0 ms for 1-2 rows (docs/performance.md).
//
// Built on the user's machine by ankh3_jax/cpu_kernels.py (-march=native); without AVX2
// and FMA it does not compile and the library keeps XLA's widening.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using Bf16Matrix = ffi::Buffer<ffi::BF16, 2>;
using F32Matrix = ffi::Buffer<ffi::F32, 2>;

static inline float Widen(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
static inline Vec Zero() { return _mm512_setzero_ps(); }
static inline Vec LoadW(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline Vec LoadX(const float* p) { return _mm512_loadu_ps(p); }
static inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float Sum(Vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int kLanes = 8;
static inline Vec Zero() { return _mm256_setzero_ps(); }
static inline Vec LoadW(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline Vec LoadX(const float* p) { return _mm256_loadu_ps(p); }
static inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float Sum(Vec v) {
  float lanes[8];
  _mm256_storeu_ps(lanes, v);
  float s = 0;
  for (float l : lanes) s += l;
  return s;
}
#else
#error "needs AVX-512 or AVX2 with FMA (the library then keeps XLA's widening)"
#endif

// Bytes ahead of the kernel stream to prefetch: a core's own stream then reaches the
// memory's speed (7 GB/s against 3.4 without, one core of a 2-vCPU Xeon).
constexpr int64_t kPrefetch = 2048;

// sums[p * RN + q] = sum_i w[o + p, i] x[q, i] for P kernel rows and RN rows of x: each
// element loaded serves P x RN products.
template <int P, int RN>
static void Tile(const uint16_t* wo, const float* xr, int64_t in, float* sums) {
  int64_t i = 0;
  Vec acc[P][RN];
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < RN; ++q) acc[p][q] = Zero();
  for (; i + kLanes <= in; i += kLanes) {
    Vec w[P];
    for (int p = 0; p < P; ++p) {
      _mm_prefetch((const char*)(wo + p * in + i + kPrefetch), _MM_HINT_T0);
      w[p] = LoadW(wo + p * in + i);
    }
    for (int q = 0; q < RN; ++q) {
      const Vec xv = LoadX(xr + q * in + i);
      for (int p = 0; p < P; ++p) acc[p][q] = Fma(w[p], xv, acc[p][q]);
    }
  }
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < RN; ++q) sums[p * RN + q] = Sum(acc[p][q]);
  for (; i < in; ++i)
    for (int p = 0; p < P; ++p)
      for (int q = 0; q < RN; ++q) sums[p * RN + q] += Widen(wo[p * in + i]) * xr[q * in + i];
}

template <int P>
static void Rows(const uint16_t* wo, const float* xr, int64_t in, int rn, float* sums) {
  switch (rn) {
    case 1: Tile<P, 1>(wo, xr, in, sums); break;
    case 2: Tile<P, 2>(wo, xr, in, sums); break;
    case 3: Tile<P, 3>(wo, xr, in, sums); break;
    default: Tile<P, 4>(wo, xr, in, sums); break;
  }
}

static void Block(const uint16_t* w, const float* x, float* y, int64_t in, int64_t r,
                  int64_t out, int64_t o0, int64_t o1) {
  constexpr int R = 4, P = 2;
  float sums[P * R];
  for (int64_t o = o0; o < o1; o += P) {
    const int pn = int(std::min<int64_t>(P, o1 - o));
    for (int64_t r0 = 0; r0 < r; r0 += R) {
      const float* xr = x + r0 * in;
      const int rn = int(std::min<int64_t>(R, r - r0));
      if (pn == P) Rows<P>(w + o * in, xr, in, rn, sums);
      else Rows<1>(w + o * in, xr, in, rn, sums);
      for (int p = 0; p < pn; ++p)
        for (int q = 0; q < rn; ++q) y[(r0 + q) * out + o + p] = sums[p * rn + q];
    }
  }
}

// Output rows are shared out in chunks: the calling thread and up to (pool threads - 1)
// helpers take chunks until none is left, so the call never waits on a helper that has
// not started (a busy pool just leaves the caller more chunks).
struct Work {
  const uint16_t* w; const float* x; float* y;
  int64_t in, r, out, chunk, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
  void Run() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      int64_t o0 = c * chunk, o1 = std::min(out, o0 + chunk);
      Block(w, x, y, in, r, out, o0, o1);
      if (done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

static ffi::Error Impl(ffi::ThreadPool pool, Bf16Matrix w, F32Matrix x,
                       ffi::Result<F32Matrix> y) {
  auto wd = w.dimensions(), xd = x.dimensions();
  int64_t out = wd[0], in = wd[1], r = xd[0];
  if (xd[1] != in) return ffi::Error::InvalidArgument("rows and kernel disagree on `in`");
  auto work = std::make_shared<Work>();
  work->w = reinterpret_cast<const uint16_t*>(w.typed_data());
  work->x = x.typed_data();
  work->y = y->typed_data();
  work->in = in; work->r = r; work->out = out;
  work->chunk = 64;  // output rows per chunk: 60 chunks for a 3840-row kernel
  work->chunks = (out + work->chunk - 1) / work->chunk;
  int64_t helpers = std::min<int64_t>(pool.num_threads(), work->chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == work->chunks; });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Bf16RowsProduct, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Bf16Matrix>()
                                  .Arg<F32Matrix>()
                                  .Ret<F32Matrix>());
