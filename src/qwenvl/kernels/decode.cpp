// The small float32 ops of a CPU decode step, each one call instead of a chain of torch ops.
//
// At batch 1 a decoder layer's work besides its four GEMVs is a few thousand flops, but in eager
// torch it is ~40 ops (RMSNorm is 7, rotary 12, the paged-cache write, gather, GQA expansion,
// masked SDPA and scatter another 15), each 5-20 us of dispatch on a small CPU: a third of a
// 2B-shape decode step went there. These ops do the same arithmetic in one pass each:
//   rms_norm          y = w * (x * rsqrt(mean(x^2) + eps))               (rows in parallel)
//   silu_mul          y = silu(g) * u for gu = [g | u]                    (the SwiGLU gate)
//   decode_attention  rotary on q and k, k/v written to their cache slots, then each token's
//                     GQA attention over its keys; one task per (token, kv head).
// Plain loops with 8 independent accumulators, which the compiler vectorises for the -march of
// the build (gemv.cpp's flags); float32 only: callers fall back to torch for other dtypes.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace qwenvl {
namespace {

constexpr int kLanes = 8;

// sum of f(i) over [0, n) in kLanes independent partial sums, so that the loop vectorises
// (a single float accumulator is a chain the compiler may not reorder).
template <class F>
inline float lane_sum(int64_t n, const F& f) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += f(i + l);
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; i < n; ++i) s += f(i);
  return s;
}

inline float dot(const float* a, const float* b, int64_t n) {
  return lane_sum(n, [=](int64_t i) { return a[i] * b[i]; });
}

inline float sum(const float* a, int64_t n) {
  return lane_sum(n, [=](int64_t i) { return a[i]; });
}

// Rotate-half rotary: out[j] = x[j] cos[j] - x[j + D/2] sin[j] (j < D/2), x[j] cos[j] +
// x[j - D/2] sin[j] (j >= D/2).
inline void rotary(const float* x, const float* c, const float* s, int64_t D, float* out) {
  const int64_t h = D / 2;
  for (int64_t j = 0; j < h; ++j) out[j] = x[j] * c[j] - x[j + h] * s[j];
  for (int64_t j = h; j < D; ++j) out[j] = x[j] * c[j] + x[j - h] * s[j];
}

}  // namespace

void rms_norm_rows(const float* x, const float* w, float eps, int64_t D, float* y, int64_t r0,
                   int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    const float inv = 1.f / std::sqrt(dot(xr, xr, D) / D + eps);
    for (int64_t i = 0; i < D; ++i) yr[i] = w[i] * (xr[i] * inv);
  }
}

void silu_mul_span(const float* g, const float* u, float* y, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) y[i] = g[i] / (1.f + exp_f32(-g[i])) * u[i];
}

int64_t check_attention_indices(const DecodeAttention& a) {
  int64_t most = 0;
  for (int64_t t = 0; t < a.T; ++t) {
    const int64_t n = a.lens[t];
    TORCH_CHECK(a.slots[t] >= 0 && a.slots[t] < a.S, "qwenvl decode_attention: slot out of range");
    TORCH_CHECK(n >= 1 && n <= a.W, "qwenvl decode_attention: bad key count ", n);
    for (int64_t j = 0; j < n; ++j)
      TORCH_CHECK(a.keys[t * a.W + j] >= 0 && a.keys[t * a.W + j] < a.S,
                  "qwenvl decode_attention: key slot out of range");
    most = std::max(most, n);
  }
  return most;
}

void attention_task(const DecodeAttention& a, int64_t i, float* scratch) {
  const int64_t Hkv = a.Hkv, D = a.D, G = a.H / Hkv;
  const int64_t t = i / Hkv, g = i % Hkv, n = a.lens[t], slot = a.slots[t];
  const float *ct = a.cos + t * D, *st = a.sin + t * D;
  float* qr = scratch;           // [G, D] rotated queries
  float* score = scratch + G * D;  // [G, n]
  rotary(a.k + t * a.ks + g * D, ct, st, D, a.k_cache + (slot * Hkv + g) * D);
  std::copy_n(a.v + t * a.vs + g * D, D, a.v_cache + (slot * Hkv + g) * D);
  for (int64_t h = 0; h < G; ++h) rotary(a.q + t * a.qs + (g * G + h) * D, ct, st, D, qr + h * D);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t* kt = a.keys + t * a.W;
  for (int64_t j = 0; j < n; ++j) {  // each key row is read once for the G query heads
    const float* kr = a.k_cache + (kt[j] * Hkv + g) * D;
    for (int64_t h = 0; h < G; ++h) score[h * n + j] = dot(qr + h * D, kr, D) * scale;
  }
  for (int64_t h = 0; h < G; ++h) {
    float* sc = score + h * n;
    const float mx = *std::max_element(sc, sc + n);
    for (int64_t j = 0; j < n; ++j) sc[j] = exp_f32(sc[j] - mx);
    const float inv = 1.f / sum(sc, n);
    for (int64_t j = 0; j < n; ++j) sc[j] *= inv;
  }
  float* ot = a.out + t * a.H * D + g * G * D;
  std::fill_n(ot, G * D, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const float* vr = a.v_cache + (kt[j] * Hkv + g) * D;
    for (int64_t h = 0; h < G; ++h) {
      const float p = score[h * n + j];
      float* oh = ot + h * D;
      for (int64_t d = 0; d < D; ++d) oh[d] += p * vr[d];
    }
  }
}

namespace {

void check_f32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat,
              "qwenvl decode ops: ", what, " must be a float32 CPU tensor, got ", t.scalar_type(),
              " on ", t.device());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_f32(x, "x");
  check_f32(w, "weight");
  const int64_t D = x.size(-1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == D, "qwenvl rms_norm: weight must be [", D, "], got ",
              w.sizes());
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t rows = D ? xc.numel() / D : 0;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)),
                   [&](int64_t r0, int64_t r1) { rms_norm_rows(xp, wp, e, D, yp, r0, r1); });
  return y;
}

// bf16 in and out (the prefill's gate_up GEMM output, the down GEMM's input), float32 inside:
// the same numbers as widening, the float32 op and rounding, in one pass over half the bytes.
void silu_mul_bf16_span(const uint16_t* g, const uint16_t* u, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = from_bf16(g[i]);
    y[i] = to_bf16(gi / (1.f + exp_f32(-gi)) * from_bf16(u[i]));
  }
}

at::Tensor silu_mul(const at::Tensor& gu) {
  const bool bf16 = gu.scalar_type() == at::kBFloat16;
  if (!bf16) check_f32(gu, "x");
  TORCH_CHECK(gu.device().is_cpu(), "qwenvl silu_mul: x must be a CPU tensor");
  const int64_t D2 = gu.size(-1);
  TORCH_CHECK(D2 % 2 == 0, "qwenvl silu_mul: the last dimension must be even, got ", D2);
  const int64_t D = D2 / 2;
  const at::Tensor xc = gu.contiguous();
  std::vector<int64_t> shape(xc.sizes().begin(), xc.sizes().end());
  shape.back() = D;
  at::Tensor y = at::empty(shape, xc.options());
  const int64_t rows = D ? xc.numel() / D2 : 0;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  if (bf16) {
    const auto* xp = static_cast<const uint16_t*>(xc.data_ptr());
    auto* yp = static_cast<uint16_t*>(y.data_ptr());
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        silu_mul_bf16_span(xp + r * D2, xp + r * D2 + D, yp + r * D, D);
    });
    return y;
  }
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) silu_mul_span(xp + r * D2, xp + r * D2 + D, yp + r * D, 0, D);
  });
  return y;
}

// q [T, H*D], k and v [T, Hkv*D] (rows may be strided: views into a fused qkv output), cos/sin
// [T, D]; caches [slots, Hkv, D]; token t writes its k/v to slots[t] and attends to
// keys[t, :lens[t]] (which include slots[t]). Returns [T, H*D].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& keys,
                            const at::Tensor& lens) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&cos, "cos"}, {&sin, "sin"},
                         {&k_cache, "k_cache"}, {&v_cache, "v_cache"}})
    check_f32(*t, name);
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous(),
              "qwenvl decode_attention: caches must be contiguous [slots, kv_heads, head_dim]");
  const int64_t T = q.size(0), Hkv = k_cache.size(1), D = k_cache.size(2), S = k_cache.size(0);
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && v.dim() == 2 && q.size(1) % D == 0 &&
                  k.size(1) == Hkv * D && v.size(1) == Hkv * D && k.size(0) == T && v.size(0) == T,
              "qwenvl decode_attention: q must be [T, H*D] and k, v [T, Hkv*D] with D = ", D);
  TORCH_CHECK(q.stride(1) == 1 && k.stride(1) == 1 && v.stride(1) == 1,
              "qwenvl decode_attention: q, k and v rows must be contiguous");
  const int64_t H = q.size(1) / D;
  TORCH_CHECK(H % Hkv == 0, "qwenvl decode_attention: ", H, " heads for ", Hkv, " kv heads");
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  TORCH_CHECK(c.sizes() == at::IntArrayRef({T, D}) && s.sizes() == c.sizes(),
              "qwenvl decode_attention: cos and sin must be [T, D]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && keys.scalar_type() == at::kLong &&
                  lens.scalar_type() == at::kLong && slots.numel() == T && keys.dim() == 2 &&
                  keys.size(0) == T && lens.numel() == T,
              "qwenvl decode_attention: slots [T], keys [T, W] and lens [T] must be int64");
  const at::Tensor sl = slots.contiguous(), ky = keys.contiguous(), ln = lens.contiguous();
  at::Tensor out = at::empty({T, H * D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  const DecodeAttention a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                          c.data_ptr<float>(), s.data_ptr<float>(), q.stride(0), k.stride(0),
                          v.stride(0), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                          sl.data_ptr<int64_t>(), ky.data_ptr<int64_t>(), ln.data_ptr<int64_t>(),
                          T, H, Hkv, D, ky.size(1), S, out.data_ptr<float>()};
  const int64_t most = check_attention_indices(a);
  const int64_t G = H / Hkv;
  // Each task writes its own (slot, kv head) and reads only its own sequence's keys: no races.
  at::parallel_for(0, T * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scratch(G * (D + most));
    for (int64_t i = i0; i < i1; ++i) attention_task(a, i, scratch.data());
  });
  return out;
}

}  // namespace
}  // namespace qwenvl

TORCH_LIBRARY_FRAGMENT(qwenvl_gemv, m) {
  using namespace qwenvl;
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("silu_mul(Tensor x) -> Tensor", &silu_mul);
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor slots, Tensor keys, Tensor lens) -> Tensor",
      &decode_attention);
}
