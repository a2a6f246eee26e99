// nnjax's CPU product for few rows: y (M, N) = x (M, K) @ w, w stored (K, N) or (N, K)
// in float32, bfloat16 or int8, times a per-output-channel scale when one is given.
//
// Decoding multiplies 1-16 rows by every weight matrix once a token, so its speed is the
// speed at which the weights stream from memory. XLA:CPU's dot reads float32 weights
// at about half the memory's rate for one row and far below it for eight, and converts
// int8 or bfloat16 weights to a float32 copy in memory first. This kernel reads each
// weight once, converts it in registers and keeps the rows' sums in a tile that stays
// in the L1 cache. Built by nnjax.kernels.native with the host's own compiler flags
// (-march=native), so the vector width is the machine's.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float VecF __attribute__((vector_size(64)));
typedef uint16_t VecU16 __attribute__((vector_size(32)));
typedef uint32_t VecU32 __attribute__((vector_size(64)));

// Sixteen consecutive weights as float32 (unaligned loads; conversions in registers).
inline VecF Load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline VecF Load(const uint16_t* p) {  // bfloat16: the top half of a float32
  VecU16 h;
  std::memcpy(&h, p, sizeof(h));
  return (VecF)(__builtin_convertvector(h, VecU32) << 16);
}
inline VecF Load(const int8_t* p) {  // GCC scalarizes the generic int8 conversion
#if defined(__AVX512F__)
  return (VecF)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128((const __m128i*)p);
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b)));
  VecF v;
  std::memcpy(&v, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
  return v;
#else
  VecF v;
  for (int i = 0; i < kLanes; ++i) v[i] = p[i];
  return v;
#endif
}
inline float Scalar(float v) { return v; }
inline float Scalar(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float Scalar(int8_t v) { return static_cast<float>(v); }
inline float Sum(VecF v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

struct Problem {
  const float* x;      // (M, K)
  const void* w;       // (K, N) or, transposed, (N, K)
  const float* scale;  // (N,) or null
  float* y;            // (M, N)
  int64_t m, k, n;
};

// Rows [r0, r0 + R) by columns [n0, n1) of a (K, N) kernel: the kernel's rows stream in
// blocks of four, each row's partial sums are added into a tile of R x (n1 - n0) floats.
template <typename T, int R>
void KnTile(const Problem& p, int64_t r0, int64_t n0, int64_t n1, float* tile) {
  const T* w = static_cast<const T*>(p.w);
  const int64_t width = n1 - n0, vecs = width / kLanes, K = p.k, N = p.n;
  std::fill(tile, tile + R * width, 0.0f);
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    float xs[R][4];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) xs[r][j] = p.x[(r0 + r) * K + k + j];
    const T* row = w + k * N + n0;
    for (int64_t v = 0; v < vecs; ++v) {
      const int64_t c = v * kLanes;
      if (R > 1 && k + 12 <= K) {  // rows 8 ahead: a tile's short runs defeat the streamer
        __builtin_prefetch(row + 8 * N + c);
        __builtin_prefetch(row + 9 * N + c);
        __builtin_prefetch(row + 10 * N + c);
        __builtin_prefetch(row + 11 * N + c);
      }
      const VecF w0 = Load(row + c), w1 = Load(row + N + c), w2 = Load(row + 2 * N + c),
                 w3 = Load(row + 3 * N + c);
      for (int r = 0; r < R; ++r) {
        VecF acc = Load(tile + r * width + c);
        acc += w0 * xs[r][0] + w1 * xs[r][1] + w2 * xs[r][2] + w3 * xs[r][3];
        std::memcpy(tile + r * width + c, &acc, sizeof(acc));
      }
    }
    for (int64_t c = vecs * kLanes; c < width; ++c)
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < 4; ++j)
          tile[r * width + c] += p.x[(r0 + r) * K + k + j] * Scalar(row[j * N + c]);
  }
  for (; k < K; ++k) {
    const T* row = w + k * N + n0;
    for (int r = 0; r < R; ++r) {
      const float xv = p.x[(r0 + r) * K + k];
      for (int64_t c = 0; c < width; ++c) tile[r * width + c] += xv * Scalar(row[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < width; ++c) {
      const float s = p.scale ? p.scale[n0 + c] : 1.0f;
      p.y[(r0 + r) * N + n0 + c] = tile[r * width + c] * s;
    }
}

// Rows [r0, r0 + R) times kernel rows [n, n + C) of an (N, K) kernel: one dot product
// per output; each x vector loaded once for the C kernel rows.
template <typename T, int R, int C>
void NkRows(const Problem& p, int64_t r0, int64_t n) {
  const T* w = static_cast<const T*>(p.w);
  const int64_t K = p.k, N = p.n, vecs = K / kLanes;
  VecF acc[R][C] = {};
  for (int64_t v = 0; v < vecs; ++v) {
    VecF wv[C];
    for (int c = 0; c < C; ++c) wv[c] = Load(w + (n + c) * K + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const VecF xv = Load(p.x + (r0 + r) * K + v * kLanes);
      for (int c = 0; c < C; ++c) acc[r][c] += xv * wv[c];
    }
  }
  for (int c = 0; c < C; ++c) {
    const T* row = w + (n + c) * K;
    const float s = p.scale ? p.scale[n + c] : 1.0f;
    for (int r = 0; r < R; ++r) {
      float total = Sum(acc[r][c]);
      for (int64_t k = vecs * kLanes; k < K; ++k) total += p.x[(r0 + r) * K + k] * Scalar(row[k]);
      p.y[(r0 + r) * N + n + c] = total * s;
    }
  }
}

// All rows by columns [n0, n1) of an (N, K) kernel: kernel rows two at a time, each
// read from memory once; passes of up to 8 rows re-read them from the L1 cache.
template <typename T, int R>
void NkPass(const Problem& p, int64_t r0, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) NkRows<T, R, 2>(p, r0, n);
  if (n < n1) NkRows<T, R, 1>(p, r0, n);
}

template <typename T>
void NkTile(const Problem& p, int64_t n0, int64_t n1) {
  constexpr int64_t kStep = 16;  // kernel rows per group: all passes over them stay in L1
  for (int64_t g = n0; g < n1; g += kStep) {
    const int64_t g1 = std::min(n1, g + kStep);
    for (int64_t r0 = 0; r0 < p.m;) {
      const int64_t left = p.m - r0;
      if (left >= 8) {
        NkPass<T, 8>(p, r0, g, g1);
        r0 += 8;
      } else if (left >= 4) {
        NkPass<T, 4>(p, r0, g, g1);
        r0 += 4;
      } else if (left >= 2) {
        NkPass<T, 2>(p, r0, g, g1);
        r0 += 2;
      } else {
        NkPass<T, 1>(p, r0, g, g1);
        r0 += 1;
      }
    }
  }
}

constexpr int64_t kTileFloats = 4096;  // 16 KB of partial sums: half an L1 data cache

template <typename T, bool kTransposed>
void Columns(const Problem& p, int64_t n0, int64_t n1) {
  if (kTransposed) return NkTile<T>(p, n0, n1);
  alignas(64) float tile[kTileFloats];
  for (int64_t r0 = 0; r0 < p.m;) {
    const int64_t left = p.m - r0;
    if (left >= 16) {
      KnTile<T, 16>(p, r0, n0, n1, tile);
      r0 += 16;
    } else if (left >= 8) {
      KnTile<T, 8>(p, r0, n0, n1, tile);
      r0 += 8;
    } else if (left >= 4) {
      KnTile<T, 4>(p, r0, n0, n1, tile);
      r0 += 4;
    } else if (left >= 2) {
      KnTile<T, 2>(p, r0, n0, n1, tile);
      r0 += 2;
    } else {
      KnTile<T, 1>(p, r0, n0, n1, tile);
      r0 += 1;
    }
  }
}

// Work shared by the calling thread and helpers on XLA's intra-op pool: each takes the
// next column block until none is left. A helper that starts late finds none and only
// drops its reference, so the caller never waits on a task that has not begun.
struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t blocks = 0;
  std::function<void(int64_t)> run;
};

void Drain(Shared& s) {
  for (int64_t b; (b = s.next.fetch_add(1)) < s.blocks;) {
    s.run(b);
    s.done.fetch_add(1, std::memory_order_release);
  }
}

template <typename T, bool kTransposed>
void Dispatch(const Problem& p, ffi::ThreadPool& pool) {
  // Column blocks: a multiple of the vector width whose tile of partial sums fits
  // kTileFloats for up to 16 rows, and at least 2 blocks a thread when there is work.
  const int64_t rows = std::min<int64_t>(p.m, 16);
  const int64_t widest = std::max<int64_t>(kLanes, (kTileFloats / rows) / kLanes * kLanes);
  const int64_t bytes = p.k * p.n * static_cast<int64_t>(sizeof(T));
  const int64_t threads = bytes < (1 << 18) ? 1 : std::max<int64_t>(1, pool.num_threads());
  int64_t width = std::min<int64_t>(widest, (p.n + 2 * threads - 1) / (2 * threads));
  width = std::max<int64_t>(kLanes, (width + kLanes - 1) / kLanes * kLanes);
  auto shared = std::make_shared<Shared>();
  shared->blocks = (p.n + width - 1) / width;
  shared->run = [&p, width](int64_t b) {
    Columns<T, kTransposed>(p, b * width, std::min(p.n, (b + 1) * width));
  };
  const int64_t helpers = std::min(threads, shared->blocks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { Drain(*shared); });
  Drain(*shared);
  while (shared->done.load(std::memory_order_acquire) < shared->blocks) std::this_thread::yield();
}

ffi::Error SmallMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                       ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y,
                       bool transposed) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2)
    return ffi::Error::InvalidArgument("small_matmul: x and w must be 2-D");
  Problem p{x.typed_data(), w.untyped_data(), nullptr, y->typed_data(), xd[0], xd[1], 0};
  p.n = transposed ? wd[0] : wd[1];
  if ((transposed ? wd[1] : wd[0]) != p.k)
    return ffi::Error::InvalidArgument("small_matmul: x and w disagree on K");
  if (scale.element_count() == static_cast<size_t>(p.n)) p.scale = scale.typed_data();
  else if (scale.element_count() != 0)
    return ffi::Error::InvalidArgument("small_matmul: scale must be (N,) or empty");
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
  switch (w.element_type()) {
    case ffi::F32:
      transposed ? Dispatch<float, true>(p, pool) : Dispatch<float, false>(p, pool);
      break;
    case ffi::BF16:
      transposed ? Dispatch<uint16_t, true>(p, pool) : Dispatch<uint16_t, false>(p, pool);
      break;
    case ffi::S8:
      transposed ? Dispatch<int8_t, true>(p, pool) : Dispatch<int8_t, false>(p, pool);
      break;
    default:
      return ffi::Error::InvalidArgument("small_matmul: w must be float32, bfloat16 or int8");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnjaxSmallMatmul, SmallMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));
