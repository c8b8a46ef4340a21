// Attention in bf16 dot products under bf16 prefill: the vision tower's (non-causal, within each
// image or window segment) and the decoder's prefills (causal after their cached prefix, grouped
// kv heads).
//
// A 1280x720 picture is 4,784 patches in one segment: the score matrix of one head is 23 M floats,
// and 32 blocks x 16 heads of it cost float32 SDPA ~1 s a block on two cores, half the bf16 ViT.
// This kernel never materialises the scores (flash attention's online softmax over chunks of
// kKeys keys for blocks of kRows query rows) and does both products in bf16 pairs:
//   q' = bf16(q / sqrt(D)), k' = bf16(k), v' = bf16(v)            (rounded once, when packed)
//   s = q'.k' (exact bf16 products, float32 sums), p = exp(s - running max) rounded to bf16
//   (as 2^(s log2 e - ...): q' carries the log2 e),
//   out = sum p' v' / sum p'                                       (the same p' in both sums)
// so the output is a convex combination of the bf16-rounded values with weights summing to one.
// With AVX512-BF16 (vdpbf16ps: 32 products an instruction, twice float32 FMA) both products are
// register-blocked micro-kernels; other builds run the same arithmetic in plain loops, slower
// than SDPA, so Python only routes here where the instructions exist (bf16_attention_native).
//
// Layouts, per (segment, query head) task, in the thread's scratch: pairs of bf16 as uint32,
//   q  [rows rounded up to kRows][D/2]            (query row, pair of dims)
//   k  [keys rounded up to kKeys / 16][D/2][16]   (16 keys side by side for each pair of dims)
//   v  [keys rounded up to kKeys / 2][D]          (each dim for a pair of keys)
// Padded keys are zero and masked out of the softmax; padded query rows are computed and dropped.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace qwenvl {
namespace {

// query rows a block: 16 rows share each chunk of k' and v' while it is in L1 (a head's k' and v'
// at 4,784 keys, 1.5 MB, stream from L3 once a block); the products' micro-kernels take 4 at once
constexpr int kRows = 16;
constexpr int kMicro = 4;
constexpr int kKeys = 64;  // keys a chunk of the online softmax

inline uint32_t pair(float lo, float hi) { return to_bf16(lo) | uint32_t{to_bf16(hi)} << 16; }

struct Task {  // one (segment, query head): Lq query rows, Lk key rows (row strides sq, sk, sv)
  const float *q, *k, *v;
  int64_t sq, sk, sv, Lq, Lk, D;
  int64_t limit;  // causal: query row i sees keys j < i + limit (limit = Lk - Lq + 1); else Lk
  bool causal;
  float* out;  // [Nq, H, D] contiguous, at the segment's first row and this head
  int64_t so;
  int64_t keys_for(int64_t row) const { return causal ? std::min(Lk, row + limit) : Lk; }
};

struct Scratch {
  std::vector<uint32_t> q, k, v;
  std::vector<float> o;  // [kRows][D] running numerators
  void pack(const Task& t, float scale) {
    const int64_t P = t.D / 2, rows = (t.Lq + kRows - 1) / kRows * kRows;
    const int64_t keys = (t.Lk + kKeys - 1) / kKeys * kKeys;
    q.assign(rows * P, 0);
    k.assign(keys * P, 0);
    v.assign(keys / 2 * t.D, 0);
    o.resize(kRows * t.D);
    for (int64_t i = 0; i < t.Lq; ++i) {
      const float* qi = t.q + i * t.sq;
      for (int64_t p = 0; p < P; ++p) q[i * P + p] = pair(qi[2 * p] * scale, qi[2 * p + 1] * scale);
    }
    for (int64_t i = 0; i < t.Lk; ++i) {
      const float *ki = t.k + i * t.sk, *vi = t.v + i * t.sv;
      uint32_t* kb = k.data() + (i / 16) * P * 16 + i % 16;
      uint16_t* vb = reinterpret_cast<uint16_t*>(v.data() + (i / 2) * t.D) + i % 2;
      for (int64_t p = 0; p < P; ++p) kb[p * 16] = pair(ki[2 * p], ki[2 * p + 1]);
      for (int64_t d = 0; d < t.D; ++d) vb[2 * d] = to_bf16(vi[d]);
    }
  }
};

// s[r][j] = q'[r0 + r] . k'[c0 + j] for the block's kRows rows and the chunk's kKeys keys.
void scores(const Scratch& w, int64_t P, int64_t r0, int64_t c0, float (*s)[kKeys]) {
#if defined(__AVX512BF16__)
  const uint32_t* kc = w.k.data() + (c0 / 16) * P * 16;
  for (int g = 0; g < kRows; g += kMicro) {
    __m512 acc[kMicro][kKeys / 16];
    for (auto& row : acc)
      for (auto& a : row) a = _mm512_setzero_ps();
    const uint32_t* qr = w.q.data() + (r0 + g) * P;
    for (int64_t p = 0; p < P; ++p) {
      __m512i kv[kKeys / 16];
      for (int b = 0; b < kKeys / 16; ++b) kv[b] = _mm512_loadu_si512(kc + (b * P + p) * 16);
      for (int r = 0; r < kMicro; ++r) {
        const __m512i qb = _mm512_set1_epi32(static_cast<int>(qr[r * P + p]));
        for (int b = 0; b < kKeys / 16; ++b)
          acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)qb, (__m512bh)kv[b]);
      }
    }
    for (int r = 0; r < kMicro; ++r)
      for (int b = 0; b < kKeys / 16; ++b) _mm512_storeu_ps(s[g + r] + 16 * b, acc[r][b]);
  }
#else
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < kKeys; ++j) {
      const uint32_t* kj = w.k.data() + ((c0 + j) / 16) * P * 16 + (c0 + j) % 16;
      const uint32_t* qi = w.q.data() + (r0 + r) * P;
      float acc = 0.f;
      for (int64_t p = 0; p < P; ++p) {
        acc += from_bf16(qi[p] & 0xffffu) * from_bf16(kj[p * 16] & 0xffffu);
        acc += from_bf16(qi[p] >> 16) * from_bf16(kj[p * 16] >> 16);
      }
      s[r][j] = acc;
    }
#endif
}

// o[r] = o[r] * alpha[r] + sum_j p'[r][j] v'[c0 + j] over the chunk (p' as bf16 pairs).
#if defined(__AVX512BF16__)
template <int DC, int R>  // DC = D / 16 vectors a row, R rows at a time (R * DC accumulators)
void weighted_values(const Scratch& w, int64_t c0, const uint32_t (*p)[kKeys / 2],
                     const float* alpha, float* o) {
  constexpr int D = 16 * DC;
  for (int r0 = 0; r0 < kRows; r0 += R) {
    __m512 acc[R][DC];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < DC; ++c)
        acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o + (r0 + r) * D + 16 * c),
                                  _mm512_set1_ps(alpha[r0 + r]));
    const uint32_t* vc = w.v.data() + (c0 / 2) * D;
    for (int j = 0; j < kKeys / 2; ++j) {
      __m512i vv[DC];
      for (int c = 0; c < DC; ++c) vv[c] = _mm512_loadu_si512(vc + j * D + 16 * c);
      for (int r = 0; r < R; ++r) {
        const __m512i pb = _mm512_set1_epi32(static_cast<int>(p[r0 + r][j]));
        for (int c = 0; c < DC; ++c)
          acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)pb, (__m512bh)vv[c]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < DC; ++c) _mm512_storeu_ps(o + (r0 + r) * D + 16 * c, acc[r][c]);
  }
}
#endif

void weighted_values(const Scratch& w, int64_t D, int64_t c0, const uint32_t (*p)[kKeys / 2],
                     const float* alpha, float* o) {
#if defined(__AVX512BF16__)
  switch (D / 16) {  // R * DC <= 20 of the 32 vector registers
    case 1: return weighted_values<1, 4>(w, c0, p, alpha, o);
    case 2: return weighted_values<2, 4>(w, c0, p, alpha, o);
    case 3: return weighted_values<3, 4>(w, c0, p, alpha, o);
    case 4: return weighted_values<4, 4>(w, c0, p, alpha, o);
    case 5: return weighted_values<5, 4>(w, c0, p, alpha, o);
    case 6: return weighted_values<6, 2>(w, c0, p, alpha, o);
    case 7: return weighted_values<7, 2>(w, c0, p, alpha, o);
    case 8: return weighted_values<8, 2>(w, c0, p, alpha, o);
  }
#endif
  for (int r = 0; r < kRows; ++r) {
    float* orow = o + r * D;
    for (int64_t d = 0; d < D; ++d) orow[d] *= alpha[r];
    for (int j = 0; j < kKeys / 2; ++j) {
      const float p0 = from_bf16(p[r][j] & 0xffffu), p1 = from_bf16(p[r][j] >> 16);
      const uint32_t* vj = w.v.data() + (c0 / 2 + j) * D;
      for (int64_t d = 0; d < D; ++d)
        orow[d] += p0 * from_bf16(vj[d] & 0xffffu) + p1 * from_bf16(vj[d] >> 16);
    }
  }
}

// The online softmax of one chunk, row by row: scores s (in log2 units: q carries log2(e)) of
// `valid` keys (the rest masked) update the row's running max m and denominator l; the weights
// p' = bf16(2^(s - m)) and the numerators' rescale alpha = 2^(m_old - m) come out.
#if defined(__AVX512BF16__)
inline __m512 exp2_ps(__m512 t) {  // 2^t for t <= 0: 2^round(t) * 2^f, |f| <= 1/2, to ~4e-5
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(9.6181291e-3f);  // Taylor of 2^f = e^(f ln2), degree 4
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);  // 2^-inf = 0
}

float softmax_row(const float* s, int64_t valid, float* m, float* l, uint16_t* p) {
  constexpr int V = kKeys / 16;
  __m512 sv[V];
  __mmask16 live[V];
  __m512 mx = _mm512_set1_ps(*m);
  for (int b = 0; b < V; ++b) {
    const int64_t left = std::clamp<int64_t>(valid - 16 * b, 0, 16);
    live[b] = static_cast<__mmask16>((uint32_t{1} << left) - 1);
    sv[b] = _mm512_maskz_loadu_ps(live[b], s + 16 * b);
    mx = _mm512_mask_max_ps(mx, live[b], mx, sv[b]);
  }
  const float top = _mm512_reduce_max_ps(mx);
  const float alpha = top == *m ? 1.f : std::exp2(*m - top);  // m = -inf at the start: 0
  *m = top;
  __m512 sum = _mm512_setzero_ps();
  for (int b = 0; b < V; ++b) {
    const __m512 e = _mm512_maskz_mov_ps(live[b], exp2_ps(_mm512_sub_ps(sv[b], _mm512_set1_ps(top))));
    const __m256bh h = _mm512_cvtneps_pbh(e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16 * b), (__m256i)h);
    sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps(h));
  }
  *l = *l * alpha + _mm512_reduce_add_ps(sum);
  return alpha;
}
#else
float softmax_row(const float* s, int64_t valid, float* m, float* l, uint16_t* p) {
  float top = *m;
  for (int64_t j = 0; j < valid; ++j) top = std::max(top, s[j]);
  const float alpha = top == *m ? 1.f : std::exp2(*m - top);
  *m = top;
  float sum = 0.f;
  for (int j = 0; j < kKeys; ++j) {
    p[j] = j < valid ? to_bf16(exp_f32((s[j] - top) * 0.69314718f)) : 0;
    sum += from_bf16(p[j]);
  }
  *l = *l * alpha + sum;
  return alpha;
}
#endif

void run_task(const Task& t, float scale, Scratch& w) {
  w.pack(t, scale);
  const int64_t P = t.D / 2;
  alignas(64) float s[kRows][kKeys];
  alignas(64) uint32_t p[kRows][kKeys / 2];
  float m[kRows], l[kRows], alpha[kRows];
  for (int64_t r0 = 0; r0 < t.Lq; r0 += kRows) {
    std::fill(w.o.begin(), w.o.end(), 0.f);
    std::fill_n(m, kRows, -std::numeric_limits<float>::infinity());
    std::fill_n(l, kRows, 0.f);
    const int64_t last = t.keys_for(r0 + kRows - 1);  // the block's keys; causal: fewer
    for (int64_t c0 = 0; c0 < last; c0 += kKeys) {
      scores(w, P, r0, c0, s);
      for (int r = 0; r < kRows; ++r) {
        const int64_t valid = std::clamp<int64_t>(t.keys_for(r0 + r) - c0, 0, kKeys);
        alpha[r] = softmax_row(s[r], valid, &m[r], &l[r], reinterpret_cast<uint16_t*>(p[r]));
      }
      weighted_values(w, t.D, c0, p, alpha, w.o.data());
    }
    for (int64_t r = 0; r < kRows && r0 + r < t.Lq; ++r) {
      float* dst = t.out + (r0 + r) * t.so;
      for (int64_t d = 0; d < t.D; ++d) dst[d] = w.o[r * t.D + d] / l[r];
    }
  }
}

void check_bounds(at::IntArrayRef cu, int64_t n, const char* name) {
  TORCH_CHECK(cu.size() >= 2 && cu.front() == 0 && cu.back() == n, "qwenvl bf16_attention: ",
              name, " must run from 0 to N = ", n);
  for (size_t i = 1; i < cu.size(); ++i)
    TORCH_CHECK(cu[i] >= cu[i - 1], "qwenvl bf16_attention: ", name, " must not decrease");
}

// q [Nq, H, D], k and v [Nk, Hkv, D] float32 (the last dim contiguous; rows may be strided views
// of a fused qkv), H a multiple of Hkv (grouped-query attention); segment i's queries
// [cu_q[i], cu_q[i+1]) attend its keys [cu_k[i], cu_k[i+1]), all of them or, causal, those up to
// their own position when the queries are the segment's last tokens. Returns [Nq, H, D].
at::Tensor bf16_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          at::IntArrayRef cu_q, at::IntArrayRef cu_k, bool causal) {
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3 &&
                    t->size(2) == q.size(2) && t->stride(2) == 1 && t->stride(0) >= 0,
                "qwenvl bf16_attention: q, k, v must be float32 CPU [N, heads, D] with one D and "
                "contiguous last dims, got ",
                t->sizes());
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(1) % k.size(1) == 0,
              "qwenvl bf16_attention: k and v must be one shape, their heads dividing q's");
  const int64_t H = q.size(1), Hkv = k.size(1), D = q.size(2);
  TORCH_CHECK(D % 16 == 0 && D >= 16 && D <= 128,
              "qwenvl bf16_attention: head_dim must be a multiple of 16 up to 128, got ", D);
  check_bounds(cu_q, q.size(0), "cu_seqlens");
  check_bounds(cu_k, k.size(0), "cu_keys");
  TORCH_CHECK(cu_q.size() == cu_k.size(), "qwenvl bf16_attention: one key segment per query one");
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  std::vector<std::pair<size_t, int64_t>> tasks;  // (segment, query head)
  for (size_t i = 1; i < cu_q.size(); ++i) {
    const int64_t lq = cu_q[i] - cu_q[i - 1], lk = cu_k[i] - cu_k[i - 1];
    TORCH_CHECK(!causal || lk >= lq, "qwenvl bf16_attention: causal segments need keys >= queries");
    if (lq > 0 && lk > 0)
      for (int64_t h = 0; h < H; ++h) tasks.emplace_back(i - 1, h);
  }
  const float scale = 1.4426950409f / std::sqrt(static_cast<float>(D));  // log2(e): exp2 later
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t i0, int64_t i1) {
    Scratch w;
    for (int64_t i = i0; i < i1; ++i) {
      const auto [seg, h] = tasks[i];
      const int64_t g = h / (H / Hkv), rq = cu_q[seg], rk = cu_k[seg];
      const int64_t lq = cu_q[seg + 1] - rq, lk = cu_k[seg + 1] - rk;
      const Task t{qp + rq * q.stride(0) + h * q.stride(1), kp + rk * k.stride(0) + g * k.stride(1),
                   vp + rk * v.stride(0) + g * v.stride(1), q.stride(0), k.stride(0), v.stride(0),
                   lq, lk, D, causal ? lk - lq + 1 : lk, causal, op + (rq * H + h) * D, H * D};
      run_task(t, scale, w);
    }
  });
  return out;
}

}  // namespace
}  // namespace qwenvl

TORCH_LIBRARY_FRAGMENT(qwenvl_gemv, m) {
  m.def("bf16_attention(Tensor q, Tensor k, Tensor v, int[] cu_q, int[] cu_k, bool causal) -> Tensor",
        &qwenvl::bf16_attention);
  m.def("bf16_attention_native() -> bool", [] {
#if defined(__AVX512BF16__)
    return true;
#else
    return false;
#endif
  });
}
