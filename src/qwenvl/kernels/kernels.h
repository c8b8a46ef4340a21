// What the kernel sources share: the GEMV over a span of its work units (gemv.cpp) and the
// decode step's small float32 ops on raw pointers (decode.cpp), so that layers.cpp can run a whole
// decoder inside one parallel region. The torch ops of gemv.cpp and decode.cpp are these same
// functions under an at::parallel_for.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace qwenvl {

#if defined(__AVX2__)
// 8 int32 accumulators' lane sums as one vector [sum a0, ..., sum a7], added in fp32 (eight lanes
// of int32 sums together may not fit int32): the int8 tiles' and the int4 blocks' final reduction.
inline __m256 reduce8(const __m256i* a) {
  __m256 f[8];
  for (int r = 0; r < 8; ++r) f[r] = _mm256_cvtepi32_ps(a[r]);
  const __m256 h1 = _mm256_hadd_ps(f[0], f[1]), h2 = _mm256_hadd_ps(f[2], f[3]);
  const __m256 h3 = _mm256_hadd_ps(f[4], f[5]), h4 = _mm256_hadd_ps(f[6], f[7]);
  const __m256 h5 = _mm256_hadd_ps(h1, h2), h6 = _mm256_hadd_ps(h3, h4);
  const __m256 lo = _mm256_permute2f128_ps(h5, h6, 0x20);
  const __m256 hi = _mm256_permute2f128_ps(h5, h6, 0x31);
  return _mm256_add_ps(lo, hi);
}
#endif

// exp(x) to ~2 ulp, branch-free so that loops over it vectorise (std::exp is a scalar call, and
// 9k of them, the SwiGLU gate of one token, took longer than torch's whole silu-and-mul):
// x = n ln2 + r with |r| <= ln2/2, exp(r) by Cephes' degree-7 polynomial, 2^n from the exponent
// bits. Inputs are clamped to [-87.3, 88.7], so the result is a normal float; NaN stays NaN.
// The selects vectorise only with -fno-trapping-math, which the build passes.
inline float exp_f32(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.7f ? 88.7f : x;
  const float t = x * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(t + std::copysign(0.5f, t));
  const float fn = static_cast<float>(n);
  const float r = (x - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = (p * r * r + r) + 1.f;
  const uint32_t bits = static_cast<uint32_t>(n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

// bf16 <-> float32: round to nearest even (finite inputs), and widening (exact).
inline uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float from_bf16(uint32_t h) {
  const uint32_t u = h << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

constexpr int64_t kMaxM = 16;  // rows of x a GEMV takes (kernels.MAX_M)

enum class WeightKind { kBF16, kF16, kInt8Rows, kInt8Tiled, kInt4 };

// A packed weight: bf16 or fp16 [N, K]; int8 [N, K] or tiled [N/8, K/16, 8, 16] with fp32 scale [N];
// int4 blocks (int4.cpp: [ceil(N/8), K/group, 4 * group + 32] bytes, scales inside);
// optional fp32 bias [N].
struct Weight {
  WeightKind kind;
  const void* data;
  const float* scale;
  const float* bias;
  int64_t N, K;
  int64_t group = 0;  // int4: columns per scale group (a multiple of 128)
  int bits = 4;       // kInt4 blocks: 4-bit nibbles, or 8-bit (GPTQ-Int8, signed q - 128)
  // int4 with GPTQ act-order: y = x[:, perm] @ W^T (perm [K], a permutation of 0..K-1)
  const int64_t* perm = nullptr;
};

// The rows x [M, K] of one GEMV, and their int16 quantisation (xq [M, K], row scales xs [M])
// where the weight's path multiplies in int16 (wants_i16).
struct Rows {
  const float* x;
  const int16_t* xq;
  const float* xs;
  int64_t M;
  // int4 weights: x quantised to int8 per (row, group of the weight's columns), xq8 [M, K], and
  // per (row, group) its scale and the sum of its dequantised values, xg [M, K / group, 2]
  const int8_t* xq8 = nullptr;
  const float* xg = nullptr;
};

bool wants_i16(const Weight& w);
bool wants_i8_groups(const Weight& w);
// Per-(row, group) symmetric int8 quantisation of x [M, K] for int4 weights of this group size:
// xq8 [M, K]; xg [M, K / group, 2] = (scale, scale * sum of the row's int8 values in the group).
// With perm, the columns of x[:, perm] (GPTQ act-order) are quantised: the gather costs K loads
// per row, the weight itself was permuted once at load.
void quantize_rows_i8_groups(const float* x, int64_t M, int64_t K, int64_t group,
                             const int64_t* perm, int8_t* xq8, float* xg);
// int4 units (8 output rows each) [u0, u1) of gemv_span.
void int4_span(const Weight& w, const Rows& x, float* y, int64_t u0, int64_t u1, bool accumulate);
// Bytes of one int4 block: 8 rows x group/2 bytes of nibbles, then 8 fp16 scales and 8 fp16 mins
// (8-bit blocks: 8 rows x group bytes, then the same 32 bytes).
constexpr int64_t int4_block_bytes(int64_t group, int bits = 4) {
  return 8 * group * bits / 8 + 8 * 4;
}
// Per-row symmetric int16 quantisation of x (error <= max|x| / 65534 per element).
void quantize_rows_i16(const float* x, int64_t M, int64_t K, int16_t* xq, float* xs);
// The GEMV is split into independent units (tiles of output rows); threads take spans of them.
int64_t gemv_units(const Weight& w, int64_t M);
// y[M, N] (row stride N) = x @ W^T * scale + bias for the output rows of units [u0, u1); with
// accumulate, added to y instead (a residual connection folded into the GEMV).
void gemv_span(const Weight& w, const Rows& x, float* y, int64_t u0, int64_t u1, bool accumulate);

// RMSNorm of rows [r0, r1) of x [*, D]: y = w * x * rsqrt(mean(x^2) + eps).
void rms_norm_rows(const float* x, const float* w, float eps, int64_t D, float* y, int64_t r0,
                   int64_t r1);
// y[i] = silu(g[i]) * u[i] for i in [i0, i1).
void silu_mul_span(const float* g, const float* u, float* y, int64_t i0, int64_t i1);

// One decode step's attention for a layer: token t's q [H*D] (row stride qs) and k/v [Hkv*D]
// (strides ks, vs) before rotary; cos/sin [T, D]; caches [S, Hkv, D]; token t writes slot
// slots[t] and attends to keys[t, :lens[t]] (row stride W); out [T, H*D].
struct DecodeAttention {
  const float *q, *k, *v, *cos, *sin;
  int64_t qs, ks, vs;
  float *k_cache, *v_cache;
  const int64_t *slots, *keys, *lens;
  int64_t T, H, Hkv, D, W, S;
  float* out;
};
// Task i = (token i / Hkv, kv head i % Hkv): rotary, cache write and the G = H / Hkv query
// heads' attention. scratch holds G * D + G * lens[t] floats. Tasks touch disjoint data.
void attention_task(const DecodeAttention& a, int64_t i, float* scratch);
// Throws (before anything is written) unless the slots and key slots are in [0, S) and every
// lens[t] in [1, W]; returns the largest lens[t].
int64_t check_attention_indices(const DecodeAttention& a);

}  // namespace qwenvl
