// Decode-time GEMV for the CPU: y[M,N] = x[M,K] @ W[N,K]^T (+ bias) with small M (<= 16).
//
// Decode is memory-bandwidth bound: every step streams all weights once. Stock torch rereads W
// per row of x and converts bf16 slowly, so here each tile of NR weight rows is read from DRAM
// once, widened to fp32 in registers (bf16: 16-bit shift; int8: sign-extend + cvt) and FMA'd
// into the accumulators of every x row while it sits in L1. Threads split N (at::parallel_for).
// Light headers and TORCH_LIBRARY (no pybind, no torch/extension.h) keep the first build short.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace qwenvl {
namespace {

constexpr int kMaxNR = 8;
#ifndef GEMV_KC
#define GEMV_KC 1024
#endif
#if !defined(GEMV_PF) && (defined(__AVX2__) || defined(__AVX512F__))
#define GEMV_PF 1  // software prefetch of the next weight tile (tuning knob: -DGEMV_PF=0)
#elif !defined(GEMV_PF)
#define GEMV_PF 0
#endif
// Rows longer than this are left to the hardware prefetchers: over 8 rows of 17.5 KB (a bf16
// down projection) the software prefetch runs 140 KB ahead and cost ~10 % of the GEMV's rate
// (interleaved runs: 0.98 vs 0.89 of a plain read), while over int8 rows of 8.75 KB it still
// gained as much (0.91 vs 0.79). Tuning knob: -DGEMV_PF_MAX_ROW=bytes.
#ifndef GEMV_PF_MAX_ROW
#define GEMV_PF_MAX_ROW 12288
#endif
constexpr int64_t KC = GEMV_KC;  // K block: the weight tile stays in L1 across the x rows

constexpr bool short_rows(int64_t row_bytes) { return row_bytes <= GEMV_PF_MAX_ROW; }

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float w_to_f32(uint16_t v) { return bf16_to_f32(v); }
inline float w_to_f32(int8_t v) { return static_cast<float>(v); }
// An fp16 weight (the AWQ/GPTQ releases' 16-bit tensors): its own type so the templates widen it
// with vcvtph2ps instead of bf16's shift.
struct F16 {
  uint16_t bits;
};
inline float w_to_f32(F16 v) {
  return static_cast<float>(c10::Half(v.bits, c10::Half::from_bits()));
}

// One SIMD flavour per ISA: width W, widening loads of weights and x, FMA, horizontal sum.
#if defined(__AVX512F__)
struct Vec {
  using T = __m512;
  static constexpr int W = 16;
  static constexpr int NR1 = 8, NR = 4, MR = 4;  // 32 zmm: MR*NR accumulators + MR x + w
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T load(const uint16_t* p) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  }
  static T load(const F16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static T load(const int8_t* p) {
    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
  }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T pin(T v) {
    asm("" : "+v"(v));
    return v;
  }
  static float hsum(T v) { return _mm512_reduce_add_ps(v); }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec {
  using T = __m256;
  static constexpr int W = 8;
#ifndef GEMV_NR1
#define GEMV_NR1 8
#define GEMV_NR 2
#define GEMV_MR 4
#endif
  static constexpr int NR1 = GEMV_NR1, NR = GEMV_NR, MR = GEMV_MR;  // 16 ymm: MR*NR acc + MR x + w
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T load(const uint16_t* p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
  static T load(const F16* p) {  // F16C: every AVX2 CPU has it
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static T load(const int8_t* p) {
    __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
  }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T pin(T v) {  // keeps v in a register: an empty asm the compiler cannot see through
    asm("" : "+x"(v));
    return v;
  }
  static float hsum(T v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#else
struct Vec {  // portable fallback: "vectors" of one float, the compiler may auto-vectorise
  using T = float;
  static constexpr int W = 1;
  static constexpr int NR1 = 4, NR = 2, MR = 4;
  static T zero() { return 0.f; }
  static T load(const float* p) { return *p; }
  static T load(const uint16_t* p) { return bf16_to_f32(*p); }
  static T load(const F16* p) { return w_to_f32(*p); }
  static T load(const int8_t* p) { return static_cast<float>(*p); }
  static T fma(T a, T b, T c) { return a * b + c; }
  static T pin(T v) { return v; }
  static float hsum(T v) { return v; }
};
#endif

// acc[m][r] += dot(x[m, k0:k1], w[r, k0:k1]) for MR_ x rows and NR_ weight rows (k1 - k0 a
// multiple of Vec::W): MR_ * NR_ independent FMA chains. The MR_ x vectors are loaded once per
// k step and pinned in registers (else the compiler re-loads them inside every FMA, and the
// load ports, not the FMA units, set the pace); each weight vector is widened once.
template <int MR_, int NR_, class WT>
inline void micro(const float* x, int64_t K, const WT* w, int64_t k0, int64_t k1,
                  float (*acc)[kMaxNR], bool prefetch) {
  typename Vec::T a[MR_][NR_];
  for (int m = 0; m < MR_; ++m)
    for (int r = 0; r < NR_; ++r) a[m][r] = Vec::zero();
  for (int64_t k = k0; k < k1; k += Vec::W) {
#if GEMV_PF > 0
    // Short rows end before the hardware prefetcher ramps up on each new tile, so fetch the
    // next tile's rows (same columns) one line per row per 64 bytes, from the first x group.
    if (prefetch && k % (64 / sizeof(WT)) == 0)
      for (int r = 0; r < NR_; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + (r + NR_) * K + k), _MM_HINT_T0);
#endif
    typename Vec::T xv[MR_];
    for (int m = 0; m < MR_; ++m) xv[m] = Vec::pin(Vec::load(x + m * K + k));
    for (int r = 0; r < NR_; ++r) {
      const typename Vec::T wv = Vec::load(w + r * K + k);
      for (int m = 0; m < MR_; ++m) a[m][r] = Vec::fma(xv[m], wv, a[m][r]);
    }
  }
  for (int m = 0; m < MR_; ++m)
    for (int r = 0; r < NR_; ++r) acc[m][r] += Vec::hsum(a[m][r]);
}

// Leftover x rows in a group of MR: c itself when reachable (c < MR), else any valid size.
constexpr int rem(int c, int mr) { return c < mr ? c : 1; }

// Rows [n, n + NR_) of y for all M rows of x, x rows in groups of MR_ (the last group smaller).
// K is blocked so the NR_ x KC weight tile, read from DRAM once, is reused from L1 by every group.
template <int NR_, int MR_, class WT>
void tile(const float* x, int64_t M, int64_t K, const WT* w, const float* scale,
          const float* bias, float* y, int64_t N, int64_t n, bool accumulate) {
  float acc[kMaxM][kMaxNR] = {};
  const WT* wt = w + n * K;
  const bool prefetch = short_rows(K * static_cast<int64_t>(sizeof(WT)));
  const int64_t kv = K - K % Vec::W;
  for (int64_t k0 = 0; k0 < kv; k0 += KC) {
    const int64_t k1 = std::min(k0 + KC, kv);
    int64_t m = 0;
    for (; m + MR_ <= M; m += MR_)
      micro<MR_, NR_>(x + m * K, K, wt, k0, k1, acc + m, prefetch && m == 0);
    const bool pf = prefetch && m == 0;
    switch (M - m) {
      case 5: micro<rem(5, MR_), NR_>(x + m * K, K, wt, k0, k1, acc + m, pf); break;
      case 4: micro<rem(4, MR_), NR_>(x + m * K, K, wt, k0, k1, acc + m, pf); break;
      case 3: micro<rem(3, MR_), NR_>(x + m * K, K, wt, k0, k1, acc + m, pf); break;
      case 2: micro<rem(2, MR_), NR_>(x + m * K, K, wt, k0, k1, acc + m, pf); break;
      case 1: micro<1, NR_>(x + m * K, K, wt, k0, k1, acc + m, pf); break;
      default: break;
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int r = 0; r < NR_; ++r) {
      float s = acc[m][r];
      for (int64_t k = kv; k < K; ++k) s += x[m * K + k] * w_to_f32(wt[r * K + k]);
      if (scale) s *= scale[n + r];
      if (bias) s += bias[n + r];
      float& out = y[m * N + n + r];
      out = accumulate ? out + s : s;
    }
}

// Units [u0, u1) of NR_ output rows each; the last unit may be short (its rows go one at a time).
template <int NR_, int MR_, class WT>
void tiles_span(const float* x, int64_t M, int64_t K, const WT* w, int64_t N, const float* scale,
                const float* bias, float* y, int64_t u0, int64_t u1, bool accumulate) {
  for (int64_t t = u0; t < u1; ++t) {
    const int64_t n = t * NR_;
    if (n + NR_ <= N) {
      tile<NR_, MR_>(x, M, K, w, scale, bias, y, N, n, accumulate);
    } else {
      for (int64_t j = n; j < N; ++j) tile<1, MR_>(x, M, K, w, scale, bias, y, N, j, accumulate);
    }
  }
}

// One x row against short weight rows (the units' rows [n0, n1)): each row is read start to end
// with U independent FMA chains, so a thread's rows are ONE sequential stream through memory. The
// NR1-row tiles read 8 rows side by side, 8 streams that each end after K = 1536 bf16 (3 KB),
// before the hardware prefetchers ramp up; over the 2B's q/k/v, gate/up and LM-head shapes the
// row order streamed at 33-52 GB/s against the tiles' 27-34 (standalone, 2 threads, alternating
// runs; the read bandwidth of this shared box moves between ~34 and ~60). Rows of K = 8960 (the
// down projection) stay in tiles: there the row order was slower (25 against 31 GB/s).
template <class WT>
void rows_one(const float* x, int64_t K, const WT* w, const float* bias, float* y, int64_t n0,
              int64_t n1, bool accumulate) {
  constexpr int U = 4;
  const int64_t step = Vec::W * U, kv = K - K % step;
  for (int64_t n = n0; n < n1; ++n) {
    const WT* wr = w + n * K;
    typename Vec::T a[U];
    for (int u = 0; u < U; ++u) a[u] = Vec::zero();
    for (int64_t k = 0; k < kv; k += step)
      for (int u = 0; u < U; ++u)
        a[u] = Vec::fma(Vec::load(x + k + u * Vec::W), Vec::load(wr + k + u * Vec::W), a[u]);
    float s = 0.f;
    for (int u = 0; u < U; ++u) s += Vec::hsum(a[u]);
    for (int64_t k = kv; k < K; ++k) s += x[k] * w_to_f32(wr[k]);
    if (bias) s += bias[n];
    y[n] = accumulate ? y[n] + s : s;
  }
}

// M = 1 over units [u0, u1) of NR1 rows: short rows in row order, long ones in tiles.
template <class WT>
void one_row_span(const float* x, int64_t K, const WT* w, int64_t N, const float* bias, float* y,
                  int64_t u0, int64_t u1, bool accumulate) {
  if (short_rows(K * static_cast<int64_t>(sizeof(WT))))
    rows_one(x, K, w, bias, y, u0 * Vec::NR1, std::min(u1 * Vec::NR1, N), accumulate);
  else
    tiles_span<Vec::NR1, 1>(x, 1, K, w, N, nullptr, bias, y, u0, u1, accumulate);
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// int8 weights on AVX2: widening each weight to fp32 costs two instructions per 8 weights, so the
// fp path is bound by arithmetic, not DRAM. Instead x is quantised to int16 once per call (per
// row, symmetric: error <= max|x| / 65534) and vpmaddwd multiplies 16 int8->int16 weights by 16
// x values and adds pairs in one instruction. A lane adds at most KC16/16 = 256 such pairs, each
// at most 2 * 128 * 32767 in size: 2147418112 < 2^31, so int32 accumulators are flushed to fp32
// once per 4096 columns. (Flushing per 1024, the row kernel over the K = 8960 down projection
// streamed at 0.83 of a plain read instead of 0.89: the flushes are a cost per byte that int8
// pays twice as often as bf16.)
#define GEMV_I16 1
constexpr int64_t KC16 = 4096;
static_assert(KC16 / 16 * (2 * 128 * 32767LL) < (1LL << 31), "int32 accumulators would overflow");

inline __m256i pin_i(__m256i v) {
  asm("" : "+x"(v));
  return v;
}

template <int MR_, int NR_>
inline void micro_i16(const int16_t* x, int64_t K, const int8_t* w, int64_t k0, int64_t k1,
                      const float* xs, float (*acc)[kMaxNR], bool prefetch) {
  __m256i a[MR_][NR_];
  for (int m = 0; m < MR_; ++m)
    for (int r = 0; r < NR_; ++r) a[m][r] = _mm256_setzero_si256();
  for (int64_t k = k0; k < k1; k += 16) {
#if GEMV_PF > 0
    if (prefetch && k % 64 == 0)
      for (int r = 0; r < NR_; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + (r + NR_) * K + k), _MM_HINT_T0);
#endif
    __m256i xv[MR_];
    for (int m = 0; m < MR_; ++m)
      xv[m] = pin_i(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * K + k)));
    for (int r = 0; r < NR_; ++r) {
      const __m256i wv = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k)));
      for (int m = 0; m < MR_; ++m)
        a[m][r] = _mm256_add_epi32(a[m][r], _mm256_madd_epi16(xv[m], wv));
    }
  }
  for (int m = 0; m < MR_; ++m)
    for (int r = 0; r < NR_; ++r) acc[m][r] += xs[m] * Vec::hsum(_mm256_cvtepi32_ps(a[m][r]));
}

// As tile(), for int8 weights and int16 x (xq, row scales xs); the K tail uses fp32 x.
template <int NR_, int MR_>
void tile_i16(const float* x, const int16_t* xq, const float* xs, int64_t M, int64_t K,
              const int8_t* w, const float* scale, const float* bias, float* y, int64_t N,
              int64_t n, bool accumulate) {
  float acc[kMaxM][kMaxNR] = {};
  const int8_t* wt = w + n * K;
  const bool prefetch = short_rows(K);
  const int64_t kv = K - K % 16;
  for (int64_t k0 = 0; k0 < kv; k0 += KC16) {
    const int64_t k1 = std::min(k0 + KC16, kv);
    int64_t m = 0;
    for (; m + MR_ <= M; m += MR_)
      micro_i16<MR_, NR_>(xq + m * K, K, wt, k0, k1, xs + m, acc + m, prefetch && m == 0);
    const bool pf = prefetch && m == 0;
    switch (M - m) {
      case 3: micro_i16<rem(3, MR_), NR_>(xq + m * K, K, wt, k0, k1, xs + m, acc + m, pf); break;
      case 2: micro_i16<rem(2, MR_), NR_>(xq + m * K, K, wt, k0, k1, xs + m, acc + m, pf); break;
      case 1: micro_i16<1, NR_>(xq + m * K, K, wt, k0, k1, xs + m, acc + m, pf); break;
      default: break;
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int r = 0; r < NR_; ++r) {
      float s = acc[m][r];
      for (int64_t k = kv; k < K; ++k) s += x[m * K + k] * static_cast<float>(wt[r * K + k]);
      s *= scale[n + r];
      if (bias) s += bias[n + r];
      float& out = y[m * N + n + r];
      out = accumulate ? out + s : s;
    }
}

// Units of NR1 output rows for one x row, of 2 rows (x rows in groups of 4) for more.
void i16_span(const Rows& x, int64_t K, const int8_t* w, int64_t N, const float* scale,
              const float* bias, float* y, int64_t u0, int64_t u1, bool accumulate) {
  const int64_t M = x.M;
  const int nr = M == 1 ? Vec::NR1 : 2;
  for (int64_t t = u0; t < u1; ++t) {
    const int64_t n = t * nr;
    if (M == 1 && n + nr <= N)
      tile_i16<Vec::NR1, 1>(x.x, x.xq, x.xs, M, K, w, scale, bias, y, N, n, accumulate);
    else if (M == 1)
      for (int64_t j = n; j < N; ++j)
        tile_i16<1, 1>(x.x, x.xq, x.xs, M, K, w, scale, bias, y, N, j, accumulate);
    else if (n + nr <= N)
      tile_i16<2, 4>(x.x, x.xq, x.xs, M, K, w, scale, bias, y, N, n, accumulate);
    else
      tile_i16<1, 4>(x.x, x.xq, x.xs, M, K, w, scale, bias, y, N, n, accumulate);
  }
}
#endif


// int8 weights in 8-row tiles: qt[N/8][K/16][8][16], so each tile of 8 output rows is ONE
// sequential stream (16 bytes of row 0, 16 of row 1, ..., then the next 16 columns). In the row
// layout a tile is 8 streams K bytes apart; with short rows (K = 1536: the q/k/v, o, gate/up and
// LM-head weights, 2/3 of a decode step's bytes) they end before the hardware prefetchers ramp
// up. x is quantised to int16 per row as in i16_span; one 16-column step is 8 vpmaddwd, and the
// 8 row sums are reduced together (hadd tree) per K block.
constexpr int kTileRows = 8, kTileCols = 16;

#if defined(__AVX2__)
inline void tile_step(__m256i xv, const int8_t* p, __m256i* a) {
  for (int r = 0; r < kTileRows; ++r) {
    const __m256i wv =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + r * 16)));
    a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(xv, wv));
  }
}
#endif

// Units [u0, u1) of 8 output rows each.
void tiled_span(const int16_t* xq, const float* xs, int64_t M, int64_t K, const int8_t* qt,
                int64_t N, const float* scale, const float* bias, float* y, int64_t u0,
                int64_t u1, bool accumulate) {
  const int64_t steps = K / kTileCols, kc = KC / kTileCols;
  for (int64_t t = u0; t < u1; ++t) {
    const int8_t* base = qt + t * steps * (kTileRows * kTileCols);
    float acc[kMaxM][kTileRows] = {};
    for (int64_t s0 = 0; s0 < steps; s0 += kc) {
      const int64_t s1 = std::min(s0 + kc, steps);
      for (int64_t m = 0; m < M; ++m) {  // m > 0 re-reads the block from L1 (8 KB)
        const int16_t* xm = xq + m * K;
#if defined(__AVX2__)
        __m256i a[kTileRows];
        for (int r = 0; r < kTileRows; ++r) a[r] = _mm256_setzero_si256();
        for (int64_t st = s0; st < s1; ++st) {
          const int8_t* p = base + st * (kTileRows * kTileCols);
#if GEMV_PF > 0
          if (m == 0) {
            _mm_prefetch(reinterpret_cast<const char*>(p + 1024), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(p + 1024 + 64), _MM_HINT_T0);
          }
#endif
          const __m256i xv =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + st * kTileCols));
          tile_step(xv, p, a);
        }
        float sums[kTileRows];
        _mm256_storeu_ps(sums, reduce8(a));
        for (int r = 0; r < kTileRows; ++r) acc[m][r] += xs[m] * sums[r];
#else
        for (int64_t st = s0; st < s1; ++st) {
          const int8_t* p = base + st * (kTileRows * kTileCols);
          for (int r = 0; r < kTileRows; ++r) {
            int32_t d = 0;
            for (int c = 0; c < kTileCols; ++c)
              d += static_cast<int32_t>(xm[st * kTileCols + c]) * p[r * kTileCols + c];
            acc[m][r] += xs[m] * static_cast<float>(d);
          }
        }
#endif
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int r = 0; r < kTileRows; ++r) {
        const int64_t n = t * kTileRows + r;
        float v = acc[m][r] * scale[n];
        if (bias) v += bias[n];
        float& out = y[m * N + n];
        out = accumulate ? out + v : v;
      }
  }
}

}  // namespace

// Written to vectorise (8 partial maxima; nearbyint, which rounds like lrintf but inlines to
// vroundps): it runs once per int8 GEMV per thread, and the scalar loop took ~20 us for K = 8960.
void quantize_rows_i16(const float* x, int64_t M, int64_t K, int16_t* xq, float* xs) {
  constexpr int kLanes = 8;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float part[kLanes] = {};
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes)
      for (int l = 0; l < kLanes; ++l) part[l] = std::max(part[l], std::fabs(xr[k + l]));
    float mx = 0.f;
    for (int l = 0; l < kLanes; ++l) mx = std::max(mx, part[l]);
    for (; k < K; ++k) mx = std::max(mx, std::fabs(xr[k]));
    const float s = mx > 0.f ? mx / 32767.f : 1.f;
    xs[m] = s;
    const float inv = 1.f / s;
    for (k = 0; k < K; ++k) xq[m * K + k] = static_cast<int16_t>(std::nearbyint(xr[k] * inv));
  }
}

bool wants_i16(const Weight& w) {
#ifdef GEMV_I16
  if (w.kind == WeightKind::kInt8Rows) return true;
#endif
  return w.kind == WeightKind::kInt8Tiled;
}

// Tile shape by M: one x row wants many weight streams; more rows want more x rows per weight
// vector so the widening and the loads are shared by more FMAs.
int64_t gemv_units(const Weight& w, int64_t M) {
  if (w.kind == WeightKind::kInt8Tiled) return w.N / kTileRows;
  if (w.kind == WeightKind::kInt4) return (w.N + 7) / 8;
#ifdef GEMV_I16
  if (w.kind == WeightKind::kInt8Rows)
    return M == 1 ? (w.N + Vec::NR1 - 1) / Vec::NR1 : (w.N + 1) / 2;
#endif
  const int64_t nr = M == 1 ? Vec::NR1 : Vec::NR;
  return (w.N + nr - 1) / nr;
}

void gemv_span(const Weight& w, const Rows& x, float* y, int64_t u0, int64_t u1, bool accumulate) {
  const int64_t M = x.M, K = w.K, N = w.N;
  switch (w.kind) {
    case WeightKind::kInt4:
      int4_span(w, x, y, u0, u1, accumulate);
      return;
    case WeightKind::kInt8Tiled:
      tiled_span(x.xq, x.xs, M, K, static_cast<const int8_t*>(w.data), N, w.scale, w.bias, y, u0,
                 u1, accumulate);
      return;
    case WeightKind::kInt8Rows: {
      const auto* q = static_cast<const int8_t*>(w.data);
#ifdef GEMV_I16
      i16_span(x, K, q, N, w.scale, w.bias, y, u0, u1, accumulate);
#else
      if (M == 1)
        tiles_span<Vec::NR1, 1>(x.x, M, K, q, N, w.scale, w.bias, y, u0, u1, accumulate);
      else
        tiles_span<Vec::NR, Vec::MR>(x.x, M, K, q, N, w.scale, w.bias, y, u0, u1, accumulate);
#endif
      return;
    }
    case WeightKind::kBF16: {
      const auto* b = static_cast<const uint16_t*>(w.data);
      if (M == 1)
        one_row_span(x.x, K, b, N, w.bias, y, u0, u1, accumulate);
      else
        tiles_span<Vec::NR, Vec::MR>(x.x, M, K, b, N, nullptr, w.bias, y, u0, u1, accumulate);
      return;
    }
    case WeightKind::kF16: {
      const auto* h = static_cast<const F16*>(w.data);
      if (M == 1)
        one_row_span(x.x, K, h, N, w.bias, y, u0, u1, accumulate);
      else
        tiles_span<Vec::NR, Vec::MR>(x.x, M, K, h, N, nullptr, w.bias, y, u0, u1, accumulate);
      return;
    }
  }
}

namespace {

// Shared checks; returns x as contiguous fp32 and bias as fp32 (or undefined).
std::pair<at::Tensor, at::Tensor> prepare(const at::Tensor& x, int64_t N, int64_t K,
                                          const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu(), "qwenvl gemv: tensors must be on CPU");
  TORCH_CHECK(x.dim() == 2, "qwenvl gemv: x must be [M,K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "qwenvl gemv: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxM, "qwenvl gemv: M must be in [1, ", kMaxM,
              "], got ", x.size(0), " (use torch.matmul for larger batches)");
  TORCH_CHECK(x.size(1) == K, "qwenvl gemv: K mismatch, x ", x.sizes(), " w [", N, ", ", K, "]");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == N,
                "qwenvl gemv: bias must be a CPU tensor of shape [", N, "], got ", bias->sizes());
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), "qwenvl gemv: bias must be floating");
    b = bias->to(at::kFloat).contiguous();
  }
  return {x.to(at::kFloat).contiguous(), b};
}

// y = x @ W^T (+ bias) for a checked weight, threads over the GEMV's units.
at::Tensor linear(const at::Tensor& x, Weight w, const std::optional<at::Tensor>& bias) {
  auto [xf, b] = prepare(x, w.N, w.K, bias);
  w.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  const int64_t M = xf.size(0);
  std::vector<int16_t> xq;
  float xs[kMaxM];
  Rows rows{xf.data_ptr<float>(), nullptr, xs, M};
  if (wants_i16(w)) {
    xq.resize(M * w.K);
    quantize_rows_i16(rows.x, M, w.K, xq.data(), xs);
    rows.xq = xq.data();
  }
  at::Tensor y = at::empty({M, w.N}, xf.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, gemv_units(w, M), 16,
                   [&](int64_t u0, int64_t u1) { gemv_span(w, rows, yp, u0, u1, false); });
  return y.to(x.scalar_type());
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(),
              "qwenvl linear_bf16: w must be a contiguous CPU [N, K] tensor, got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf,
              "qwenvl linear_bf16: w must be bfloat16 or float16, got ", w.scalar_type());
  const auto kind = w.scalar_type() == at::kHalf ? WeightKind::kF16 : WeightKind::kBF16;
  return linear(x, {kind, w.data_ptr(), nullptr, nullptr, w.size(0), w.size(1)}, bias);
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.device().is_cpu(),
              "qwenvl linear_int8: qweight must be an int8 CPU tensor, got ", q.scalar_type());
  TORCH_CHECK(q.is_contiguous() && (q.dim() == 2 || (q.dim() == 4 && q.size(2) == kTileRows &&
                                                      q.size(3) == kTileCols)),
              "qwenvl linear_int8: qweight must be contiguous [N, K] or tiled [N/8, K/16, 8, 16], "
              "got ", q.sizes());
  const bool tiled = q.dim() == 4;
  const int64_t N = tiled ? q.size(0) * kTileRows : q.size(0);
  const int64_t K = tiled ? q.size(1) * kTileCols : q.size(1);
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat && scale.dim() == 1 &&
                  scale.size(0) == N && scale.is_contiguous(),
              "qwenvl linear_int8: scale must be a contiguous float32 CPU tensor of shape [", N,
              "], got ", scale.scalar_type(), " ", scale.sizes());
  const auto kind = tiled ? WeightKind::kInt8Tiled : WeightKind::kInt8Rows;
  return linear(x, {kind, q.data_ptr(), scale.data_ptr<float>(), nullptr, N, K}, bias);
}

// A contiguous copy of t in memory the kernel may back with 2 MB pages (Linux transparent huge
// pages in their default "madvise" mode): streaming gigabytes of weights through 4 KB pages costs
// a TLB miss every 4 KB; the 2B-shape decode GEMVs ran 2-6 % faster from 2 MB pages (median of
// interleaved runs). The memory is 2 MB aligned and advised before it is first touched, so the
// copy's page faults take huge pages while the kernel has them (else 4 KB pages, as before).
at::Tensor huge_page_copy(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "qwenvl huge_page_copy: a CPU tensor is required");
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
  const size_t size = std::max<size_t>(kHuge, (bytes + kHuge - 1) / kHuge * kHuge);
  void* p = nullptr;
  if (posix_memalign(&p, kHuge, size) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, size, MADV_HUGEPAGE);  // advice only: an error leaves ordinary pages
#endif
  at::Tensor out = at::from_blob(p, t.sizes(), [](void* q) { std::free(q); }, t.options());
  out.copy_(t);
  return out;
}

const char* isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace
}  // namespace qwenvl

TORCH_LIBRARY(qwenvl_gemv, m) {
  using namespace qwenvl;
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias=None) -> Tensor", &linear_bf16);
  m.def("linear_int8(Tensor x, Tensor q, Tensor scale, Tensor? bias=None) -> Tensor", &linear_int8);
  m.def("isa() -> str", [] { return std::string(isa()); });
  m.def("huge_page_copy(Tensor t) -> Tensor", &huge_page_copy);
}
