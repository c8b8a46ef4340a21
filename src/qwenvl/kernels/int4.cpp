// 4-bit weights for CPU decode: GEMV over <= 16 rows of x, streaming half a byte per weight.
//
// Layout (Int4Linear, qwenvl.layers.int4_linear): output rows in tiles of 8, columns in groups of
// G (a multiple of 128); one block per (tile, group), blocks in tile-major order, so a thread's
// span of tiles is ONE sequential stream:
//
//   block = 8 rows x G/2 bytes of nibbles | 8 fp16 scales | 8 fp16 mins      (4 G + 32 bytes)
//
// w[n, k] = q * scale + min (min = -zero * scale for an integer zero point). In a row's G/2
// bytes, each 128 columns are 64 bytes: byte j holds column j in its low nibble and column j + 64
// in its high nibble, so an AVX2 32-byte load yields 32 consecutive columns per nibble and an
// AVX-512 64-byte load 64. G = 128: 0.53 bytes per weight.
//
// 8-bit blocks (GPTQ-Int8: WeightKind::kInt4 with bits = 8, a torch.int8 tensor) hold each row's
// G columns as signed bytes q - 128 in column order, then the same fp16 scales and mins (min + 128
// scale), so w = q' * scale + min'. Their dot products put the sign on x (llama.cpp's Q8 trick):
// vpmaddubsw(|q'|, sign(x, q')) with |q'| <= 128 and |x| <= 127 keeps a pair within int16.
//
// Groups of 64 (and 32) columns are one unit of G/2 bytes (column j | column j + G/2 << 4); 64 runs
// the AVX2 code, 32 the scalar code in every build.
//
// x is quantised to int8 per (row, group) (scale amax/127; the sum of the quantised values is
// kept), so a group's dot product is integer: vpmaddubsw multiplies 32 nibbles (u8) by 32 x
// values (s8) and adds pairs (|pair| <= 2 * 15 * 127, four such sums fit int16), vpmaddwd by ones
// widens to int32 once per 128 columns. Per group and x row the 8 rows' int32 sums are reduced
// together into one vector of 8 (hadd tree) and y += sum * scale * xscale + min * xsum: the
// result is exactly the dequantised weight times the int8-rounded x, in fp32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace qwenvl {
namespace {

constexpr int kRows = 8;     // output rows per tile
constexpr int kUnit = 128;   // columns per 64 bytes of nibbles
#ifndef INT4_PF
#define INT4_PF 1024  // software prefetch distance in bytes ahead of the block being read (0: off)
#endif

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400) == 0);
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}


#if defined(__AVX2__)
// 8 rows' int32 dot products over one group of one x row, G a multiple of 128 or 64: per 128
// columns two 32-byte loads a row, four vpmaddubsw summed in int16 (4 * 3810 < 32768), one
// vpmaddwd to int32; a 64-column group is one load and two vpmaddubsw.
inline void group_dots_avx2(const uint8_t* blk, int64_t rowb, const int8_t* xm, int64_t G,
                            __m256i* s) {
  const __m256i mask = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  for (int r = 0; r < kRows; ++r) s[r] = _mm256_setzero_si256();
  if (G == 64) {
    const auto* xp = reinterpret_cast<const __m256i*>(xm);
    const __m256i x0 = _mm256_loadu_si256(xp), x1 = _mm256_loadu_si256(xp + 1);
    for (int r = 0; r < kRows; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + r * rowb));
      __m256i d = _mm256_maddubs_epi16(_mm256_and_si256(v, mask), x0);
      d = _mm256_add_epi16(
          d, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), mask), x1));
      s[r] = _mm256_madd_epi16(d, ones);
    }
    return;
  }
  for (int64_t u = 0; u < G; u += kUnit) {
    const auto* xp = reinterpret_cast<const __m256i*>(xm + u);
    const __m256i x0 = _mm256_loadu_si256(xp), x1 = _mm256_loadu_si256(xp + 1);
    const __m256i x2 = _mm256_loadu_si256(xp + 2), x3 = _mm256_loadu_si256(xp + 3);
    for (int r = 0; r < kRows; ++r) {
      const auto* p = reinterpret_cast<const __m256i*>(blk + r * rowb + u / 2);
      const __m256i v0 = _mm256_loadu_si256(p), v1 = _mm256_loadu_si256(p + 1);
      __m256i d = _mm256_maddubs_epi16(_mm256_and_si256(v0, mask), x0);
      d = _mm256_add_epi16(d, _mm256_maddubs_epi16(_mm256_and_si256(v1, mask), x1));
      d = _mm256_add_epi16(
          d, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), mask), x2));
      d = _mm256_add_epi16(
          d, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), mask), x3));
      s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(d, ones));
    }
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
// As group_dots_avx2 for G a multiple of 128: one 64-byte load a row per 128 columns (64 columns
// a nibble); vpdpbusd where the CPU has AVX512-VNNI.
inline void group_dots_avx512(const uint8_t* blk, int64_t rowb, const int8_t* xm, int64_t G,
                              __m256i* out) {
  const __m512i mask = _mm512_set1_epi8(0x0f);
#if !defined(__AVX512VNNI__)
  const __m512i ones = _mm512_set1_epi16(1);
#endif
  __m512i s[kRows];
  for (int r = 0; r < kRows; ++r) s[r] = _mm512_setzero_si512();
  for (int64_t u = 0; u < G; u += kUnit) {
    const __m512i x0 = _mm512_loadu_si512(xm + u), x1 = _mm512_loadu_si512(xm + u + 64);
    for (int r = 0; r < kRows; ++r) {
      const __m512i v = _mm512_loadu_si512(blk + r * rowb + u / 2);
      const __m512i lo = _mm512_and_si512(v, mask);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
#if defined(__AVX512VNNI__)
      s[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s[r], lo, x0), hi, x1);
#else
      const __m512i d =
          _mm512_add_epi16(_mm512_maddubs_epi16(lo, x0), _mm512_maddubs_epi16(hi, x1));
      s[r] = _mm512_add_epi32(s[r], _mm512_madd_epi16(d, ones));
#endif
    }
  }
  for (int r = 0; r < kRows; ++r)
    out[r] = _mm256_add_epi32(_mm512_castsi512_si256(s[r]), _mm512_extracti64x4_epi64(s[r], 1));
}
#endif

#if defined(__AVX2__)
inline bool simd_group(int64_t G) { return G % kUnit == 0 || G == 64; }

inline void group_dots(const uint8_t* blk, int64_t rowb, const int8_t* xm, int64_t G,
                       __m256i* s) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (G % kUnit == 0) return group_dots_avx512(blk, rowb, xm, G, s);
#endif
  group_dots_avx2(blk, rowb, xm, G, s);
}
#endif

#if defined(__AVX2__)
// 8 rows' int32 dot products over one group of 8-bit weights (G a multiple of 32).
inline void group_dots_i8_avx2(const uint8_t* blk, int64_t rowb, const int8_t* xm, int64_t G,
                               __m256i* s) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < kRows; ++r) s[r] = _mm256_setzero_si256();
  for (int64_t u = 0; u < G; u += 32) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + u));
    for (int r = 0; r < kRows; ++r) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + r * rowb + u));
      const __m256i d = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
      s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(d, ones));
    }
  }
}
#endif

// The scalar dot products of 8 rows over one group of 8-bit weights.
inline void group_dots_i8_scalar(const uint8_t* blk, int64_t rowb, const int8_t* xm, int64_t G,
                                 int32_t* d) {
  for (int r = 0; r < kRows; ++r) {
    const auto* row = reinterpret_cast<const int8_t*>(blk + r * rowb);
    int32_t acc = 0;
    for (int64_t k = 0; k < G; ++k) acc += static_cast<int32_t>(row[k]) * xm[k];
    d[r] = acc;
  }
}

// Columns per nibble unit: 128 (64 bytes: column j | column j + 64) or the whole group if smaller.
inline int64_t unit_of(int64_t G) { return G < kUnit ? G : kUnit; }

// The scalar dot products of 8 rows over one group of one x row (every build: G = 32 groups, and
// the portable path).
inline void group_dots_scalar(const uint8_t* blk, int64_t rowb, const int8_t* xm, int64_t G,
                              int32_t* d) {
  const int64_t U = unit_of(G);
  for (int r = 0; r < kRows; ++r) {
    const uint8_t* row = blk + r * rowb;
    int32_t acc = 0;
    for (int64_t u = 0; u < G; u += U)
      for (int64_t j = 0; j < U / 2; ++j) {
        const uint8_t b = row[u / 2 + j];
        acc += static_cast<int32_t>(b & 0xf) * xm[u + j] +
               static_cast<int32_t>(b >> 4) * xm[u + U / 2 + j];
      }
    d[r] = acc;
  }
}

}  // namespace

bool wants_i8_groups(const Weight& w) { return w.kind == WeightKind::kInt4; }

void quantize_rows_i8_groups(const float* x, int64_t M, int64_t K, int64_t group,
                             const int64_t* perm, int8_t* xq8, float* xg) {
  const int64_t ng = K / group;
  std::vector<float> gathered(perm ? group : 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ng; ++g) {
      const float* xr = x + m * K + g * group;
      if (perm) {  // this group's columns of x[:, perm]
        const int64_t* p = perm + g * group;
        for (int64_t k = 0; k < group; ++k) gathered[k] = x[m * K + p[k]];
        xr = gathered.data();
      }
      int8_t* q = xq8 + m * K + g * group;
      constexpr int kLanes = 8;
      float part[kLanes] = {};
      for (int64_t k = 0; k < group; k += kLanes)
        for (int l = 0; l < kLanes; ++l) part[l] = std::max(part[l], std::fabs(xr[k + l]));
      float mx = 0.f;
      for (int l = 0; l < kLanes; ++l) mx = std::max(mx, part[l]);
      const float s = mx > 0.f ? mx / 127.f : 1.f, inv = 1.f / s;
      int32_t sum = 0;
      for (int64_t k = 0; k < group; ++k) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(xr[k] * inv));
        q[k] = static_cast<int8_t>(v);
        sum += v;
      }
      xg[(m * ng + g) * 2] = s;
      xg[(m * ng + g) * 2 + 1] = s * static_cast<float>(sum);
    }
}

void int4_span(const Weight& w, const Rows& x, float* y, int64_t u0, int64_t u1, bool accumulate) {
  const int64_t M = x.M, K = w.K, N = w.N, G = w.group, ng = K / G;
  const bool i8 = w.bits == 8;
  const int64_t bb = int4_block_bytes(G, w.bits), rowb = i8 ? G : G / 2;
  const auto* base = static_cast<const uint8_t*>(w.data);
#if defined(__AVX2__)
  const bool simd = i8 || simd_group(G);
#endif
  for (int64_t t = u0; t < u1; ++t) {
    alignas(32) float acc[kMaxM][kRows] = {};
    for (int64_t g = 0; g < ng; ++g) {
      const uint8_t* blk = base + (t * ng + g) * bb;
      const uint8_t* meta = blk + kRows * rowb;  // 8 fp16 scales, 8 fp16 mins
#if defined(__AVX2__)
      if (simd) {
#if INT4_PF > 0
        for (int64_t o = 0; o < bb; o += 64)
          _mm_prefetch(reinterpret_cast<const char*>(blk + INT4_PF + o), _MM_HINT_T0);
#endif
        const __m256 sc =
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(meta)));
        const __m256 mn =
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(meta + 16)));
        for (int64_t m = 0; m < M; ++m) {  // m > 0 re-reads the block from L1
          __m256i s[kRows];
          if (i8)
            group_dots_i8_avx2(blk, rowb, x.xq8 + m * K + g * G, G, s);
          else
            group_dots(blk, rowb, x.xq8 + m * K + g * G, G, s);
          const float* xg = x.xg + (m * ng + g) * 2;
          __m256 a = _mm256_load_ps(acc[m]);
          a = _mm256_fmadd_ps(reduce8(s), _mm256_mul_ps(sc, _mm256_set1_ps(xg[0])), a);
          a = _mm256_fmadd_ps(mn, _mm256_set1_ps(xg[1]), a);
          _mm256_store_ps(acc[m], a);
        }
        continue;
      }
#endif
      float sc[kRows], mn[kRows];
      for (int r = 0; r < kRows; ++r) {
        uint16_t hs, hm;
        std::memcpy(&hs, meta + 2 * r, 2);
        std::memcpy(&hm, meta + 16 + 2 * r, 2);
        sc[r] = half_to_float(hs);
        mn[r] = half_to_float(hm);
      }
      for (int64_t m = 0; m < M; ++m) {
        int32_t d[kRows];
        if (i8)
          group_dots_i8_scalar(blk, rowb, x.xq8 + m * K + g * G, G, d);
        else
          group_dots_scalar(blk, rowb, x.xq8 + m * K + g * G, G, d);
        const float* xg = x.xg + (m * ng + g) * 2;
        for (int r = 0; r < kRows; ++r)
          acc[m][r] += static_cast<float>(d[r]) * (sc[r] * xg[0]) + mn[r] * xg[1];
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int r = 0; r < kRows; ++r) {
        const int64_t n = t * kRows + r;
        if (n >= N) break;
        float v = acc[m][r];
        if (w.bias) v += w.bias[n];
        float& out = y[m * N + n];
        out = accumulate ? out + v : v;
      }
  }
}

namespace {

// The weight of a packed tensor with N output rows: int4 blocks [ceil(N/8), K/G, 4G+32] (uint8)
// or 8-bit blocks [ceil(N/8), K/G, 8G+32] (int8).
Weight int4_weight(const at::Tensor& packed, int64_t N, const char* what) {
  const bool i8 = packed.scalar_type() == at::kChar;
  TORCH_CHECK(packed.device().is_cpu() && (i8 || packed.scalar_type() == at::kByte) &&
                  packed.dim() == 3 && packed.is_contiguous(),
              "qwenvl ", what, ": an int4 weight must be a contiguous uint8 CPU tensor "
              "[ceil(N/8), K/group, 4*group+32] (int8 [.., 8*group+32] for 8-bit groups), got ",
              packed.scalar_type(), " ", packed.sizes());
  const int bits = i8 ? 8 : 4;
  const int64_t ng = packed.size(1), bb = packed.size(2), G = (bb - 32) / bits;
  const bool ok_group = i8 ? G >= 32 && G % 32 == 0
                           : G == 32 || G == 64 || (G >= kUnit && G % kUnit == 0);
  TORCH_CHECK(ng >= 1 && ok_group && int4_block_bytes(G, bits) == bb, "qwenvl ", what, ": ",
              bits, "-bit blocks of ", bb, " bytes (group must be ",
              i8 ? "a multiple of 32" : "32, 64 or a multiple of 128", ")");
  TORCH_CHECK(N >= 1 && (N + kRows - 1) / kRows == packed.size(0), "qwenvl ", what, ": ",
              packed.size(0), " tiles of 8 rows cannot hold N = ", N);
  Weight w{WeightKind::kInt4, packed.data_ptr(), nullptr, nullptr, N, ng * G};
  w.group = G;
  w.bits = bits;
  return w;
}

}  // namespace

const int64_t* int4_perm(const at::Tensor& perm, int64_t K, const char* what) {
  TORCH_CHECK(perm.device().is_cpu() && perm.scalar_type() == at::kLong && perm.dim() == 1 &&
                  perm.size(0) == K && perm.is_contiguous(),
              "qwenvl ", what, ": an int4 act-order perm must be a contiguous int64 CPU tensor [",
              K, "], got ", perm.scalar_type(), " ", perm.sizes());
  const int64_t* p = perm.data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k)  // ~1 us per 1000 columns: cheaper than trusting the caller
    TORCH_CHECK(p[k] >= 0 && p[k] < K, "qwenvl ", what, ": perm[", k, "] = ", p[k],
                " is outside [0, ", K, ")");
  return p;
}

namespace {

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& packed, int64_t N,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& perm) {
  Weight w = int4_weight(packed, N, "linear_int4");
  if (perm.has_value() && perm->defined()) w.perm = int4_perm(*perm, w.K, "linear_int4");
  const int64_t K = w.K;
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) == K && x.size(0) >= 1 &&
                  x.size(0) <= kMaxM,
              "qwenvl linear_int4: x must be a CPU [M <= ", kMaxM, ", ", K, "] tensor, got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "qwenvl linear_int4: x must be float32 or bfloat16, got ", x.scalar_type());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == N &&
                    at::isFloatingType(bias->scalar_type()),
                "qwenvl linear_int4: bias must be a floating CPU tensor of shape [", N, "]");
    b = bias->to(at::kFloat).contiguous();
    w.bias = b.data_ptr<float>();
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  std::vector<int8_t> xq(M * K);
  std::vector<float> xg(M * (K / w.group) * 2);
  quantize_rows_i8_groups(xf.data_ptr<float>(), M, K, w.group, w.perm, xq.data(), xg.data());
  Rows rows{xf.data_ptr<float>(), nullptr, nullptr, M};
  rows.xq8 = xq.data();
  rows.xg = xg.data();
  at::Tensor y = at::empty({M, N}, xf.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, gemv_units(w, M), 8,
                   [&](int64_t u0, int64_t u1) { int4_span(w, rows, yp, u0, u1, false); });
  return y.to(x.scalar_type());
}

// One group's fit for a given (scale, min), both rounded to fp16 first (what the blocks store):
// q = clamp(round((w - min) / scale), 0, 15) and the squared error of q * scale + min.
struct Fit {
  float s, m;
  double err;
};

inline Fit fit_group(const float* w, int64_t G, float s, float m, uint8_t* q) {
  s = static_cast<float>(c10::Half(s));
  m = static_cast<float>(c10::Half(m));
  double err = 0;
  for (int64_t k = 0; k < G; ++k) {
    const float v = std::min(15.f, std::max(0.f, std::nearbyint((w[k] - m) / s)));
    q[k] = static_cast<uint8_t>(v);
    const double d = static_cast<double>(v) * s + m - w[k];
    err += d * d;
  }
  return {s, m, err};
}

// quantize_int4 (kernels/__init__.py, whose torch code is the reference) for one group:
// round-to-nearest from [min, max], then `refine` least-squares refits of (scale, min) to the
// chosen q, each kept only where it lowers the squared error.
void quantize_group(const float* w, int64_t G, int refine, uint8_t* q, uint8_t* cand, float* s,
                    float* m) {
  float lo = w[0], hi = w[0];
  for (int64_t k = 1; k < G; ++k) lo = std::min(lo, w[k]), hi = std::max(hi, w[k]);
  float s0 = (hi - lo) / 15.f;
  if (!(s0 > 0.f)) s0 = 1.f;
  Fit best = fit_group(w, G, s0, lo, q);
  for (int r = 0; r < refine; ++r) {
    double sq = 0, sqq = 0, sw = 0, sqw = 0;
    for (int64_t k = 0; k < G; ++k) {
      const double qk = q[k];
      sq += qk, sqq += qk * qk, sw += w[k], sqw += qk * w[k];
    }
    const double det = G * sqq - sq * sq;
    const double s1 = (G * sqw - sq * sw) / std::max(det, 1e-30), m1 = (sw - s1 * sq) / G;
    const bool ok = det > 0 && s1 > 0;
    const Fit c = fit_group(w, G, ok ? static_cast<float>(s1) : best.s,
                            ok ? static_cast<float>(m1) : best.m, cand);
    if (c.err < best.err) {
      best = c;
      std::memcpy(q, cand, G);
    }
  }
  *s = best.s;
  *m = best.m;
}

// w [N, K] (float32 or bfloat16) -> q uint8 [N, K], scale and min float32 [N, K / G].
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4(const at::Tensor& w, int64_t G,
                                                             int64_t refine) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && G > 0 && w.size(1) % G == 0,
              "qwenvl quantize_int4: w must be a CPU [N, K] tensor with K a multiple of the "
              "group size ", G, ", got ", w.sizes());
  const at::Tensor wf = w.to(at::kFloat).contiguous();
  const int64_t N = wf.size(0), K = wf.size(1), ng = K / G;
  at::Tensor q = at::empty({N, K}, wf.options().dtype(at::kByte));
  at::Tensor s = at::empty({N, ng}, wf.options()), m = at::empty({N, ng}, wf.options());
  const float* wp = wf.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float *sp = s.data_ptr<float>(), *mp = m.data_ptr<float>();
  at::parallel_for(0, N * ng, 64, [&](int64_t i0, int64_t i1) {
    std::vector<uint8_t> cand(G);
    for (int64_t i = i0; i < i1; ++i)
      quantize_group(wp + i * G, G, static_cast<int>(refine), qp + i * G, cand.data(), sp + i,
                     mp + i);
  });
  return {q, s, m};
}

// The dequantised weight [N, K] in float32 (prefill: the GEMM's operand), written into out.
void dequantize_int4(const at::Tensor& packed, int64_t N, const at::Tensor& out) {
  const Weight w = int4_weight(packed, N, "dequantize_int4");
  const bool i8 = w.bits == 8;
  const int64_t K = w.K, G = w.group, ng = K / G, bb = int4_block_bytes(G, w.bits);
  const int64_t rowb = i8 ? G : G / 2;
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.sizes() == at::IntArrayRef({N, K}),
              "qwenvl dequantize_int4: out must be a contiguous float32 [", N, ", ", K, "]");
  const auto* base = static_cast<const uint8_t*>(w.data);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, packed.size(0), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t g = 0; g < ng; ++g) {
        const uint8_t* blk = base + (t * ng + g) * bb;
        const uint8_t* meta = blk + kRows * rowb;
        for (int r = 0; r < kRows; ++r) {
          const int64_t n = t * kRows + r;
          if (n >= N) break;
          uint16_t hs, hm;
          std::memcpy(&hs, meta + 2 * r, 2);
          std::memcpy(&hm, meta + 16 + 2 * r, 2);
          const float s = half_to_float(hs), mn = half_to_float(hm);
          const uint8_t* row = blk + r * rowb;
          float* dst = o + n * K + g * G;
          if (i8) {
            for (int64_t k = 0; k < G; ++k)
              dst[k] = static_cast<float>(static_cast<int8_t>(row[k])) * s + mn;
            continue;
          }
          const int64_t U = unit_of(G);
          for (int64_t u = 0; u < G; u += U)
            for (int64_t j = 0; j < U / 2; ++j) {
              const uint8_t b = row[u / 2 + j];
              dst[u + j] = static_cast<float>(b & 0xf) * s + mn;
              dst[u + U / 2 + j] = static_cast<float>(b >> 4) * s + mn;
            }
        }
      }
  });
}

}  // namespace
}  // namespace qwenvl

TORCH_LIBRARY_FRAGMENT(qwenvl_gemv, m) {
  m.def("linear_int4(Tensor x, Tensor packed, int N, Tensor? bias=None, Tensor? perm=None) -> "
        "Tensor",
        &qwenvl::linear_int4);
  m.def("dequantize_int4(Tensor packed, int N, Tensor(a!) out) -> ()", &qwenvl::dequantize_int4);
  m.def("quantize_int4(Tensor w, int group, int refine) -> (Tensor, Tensor, Tensor)",
        &qwenvl::quantize_int4);
}
