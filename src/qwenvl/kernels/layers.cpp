// A packed Qwen2 decoder's layers for one all-decode CPU step, in one call and one parallel region.
//
// Called op by op (kernels.linear_*, rms_norm, decode_attention, silu_mul) a 28-layer decode step
// is ~250 torch calls: each pays dispatch, an allocation and a fork/join of the thread team, and
// together they cost ~7 ms of a ~120 ms 2B-shape step. Here the threads are forked once and
// walk the layers together, meeting at a barrier wherever one stage reads what all threads wrote:
//
//   h = rms_norm(x)                  each thread its own copy (a few us; saves a barrier)
//   qkv = h @ Wqkv^T + b             threads split the output rows       | barrier
//   attn = attention(rotary(q, k))   threads split (token, kv head)      | barrier
//   x += attn @ Wo^T                 the residual folded into the GEMV   | barrier
//   h = rms_norm(x)
//   gu = h @ Wgu^T                                                       | barrier
//   act = silu(g) * u                threads split the columns           | barrier
//   x += act @ Wdown^T                                                   | barrier
//
// The arithmetic is the same functions as the single ops (kernels.h), so both paths agree to the
// last bit.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <omp.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace qwenvl {
namespace {

constexpr int kParamsPerLayer = 14;  // norm1, qkv (w, scale, bias), o (...), norm2, gate_up, down

struct Layer {
  const float* norm1;
  Weight qkv, o;
  const float* norm2;
  Weight gate_up, down;
};

using Params = c10::List<std::optional<at::Tensor>>;

}  // namespace

// int4.cpp: the checked data of an act-order perm [K].
const int64_t* int4_perm(const at::Tensor& perm, int64_t K, const char* what);

namespace {

// The float32 CPU vector [n] at params[i]: a norm weight.
const float* vector_at(const Params& params, int64_t i, int64_t n, const char* what) {
  const std::optional<at::Tensor> t = params.get(i);
  TORCH_CHECK(t.has_value() && t->device().is_cpu() && t->scalar_type() == at::kFloat &&
                  t->dim() == 1 && t->size(0) == n && t->is_contiguous(),
              "qwenvl decode_layers: parameter ", i, " (", what, ") must be a contiguous float32 ",
              "CPU tensor [", n, "]");
  return t->data_ptr<float>();
}

// The packed linear at params[i..i+3) (weight, scale, bias) of shape [N, K], as PackedLinear
// stores it: bf16 [N, K], or int8 [N, K] / tiled [N/8, K/16, 8, 16] with a float32 scale [N];
// or as Int4Linear does: uint8 blocks [ceil(N/8), K/G, 4G+32] (scales inside; the scale entry is
// None or, for GPTQ act-order, the int64 input permutation [K]).
Weight weight_at(const Params& params, int64_t i, int64_t N, int64_t K, const char* what) {
  const std::optional<at::Tensor> w = params.get(i), scale = params.get(i + 1),
                                  bias = params.get(i + 2);
  TORCH_CHECK(w.has_value() && w->device().is_cpu() && w->is_contiguous(),
              "qwenvl decode_layers: parameter ", i, " (", what, ") must be a contiguous CPU "
              "tensor");
  Weight out{WeightKind::kBF16, w->data_ptr(), nullptr, nullptr, N, K};
  const auto shape = w->sizes();
  if (w->scalar_type() == at::kByte || (w->scalar_type() == at::kChar && shape.size() == 3)) {
    // group blocks (int4.cpp): int4 [ceil(N/8), K/G, 4G+32] uint8, 8-bit [.., 8G+32] int8
    const int bits = w->scalar_type() == at::kByte ? 4 : 8;
    const int64_t G = shape.size() == 3 && shape[1] > 0 ? K / shape[1] : 0;
    const bool ok_group = bits == 8 ? G >= 32 && G % 32 == 0
                                    : G == 32 || G == 64 || (G >= 128 && G % 128 == 0);
    TORCH_CHECK(shape.size() == 3 && ok_group && shape[1] * G == K &&
                    shape[0] == (N + 7) / 8 && shape[2] == int4_block_bytes(G, bits),
                "qwenvl decode_layers: ", bits, "-bit group ", what, " must be [", (N + 7) / 8,
                ", K/group, ", bits / 2, "*group+32] for K = ", K, ", got ", shape);
    out.kind = WeightKind::kInt4;
    out.group = G;
    out.bits = bits;
    if (scale.has_value()) out.perm = int4_perm(*scale, K, what);
  } else if (w->scalar_type() == at::kBFloat16 || w->scalar_type() == at::kHalf) {
    TORCH_CHECK(shape == at::IntArrayRef({N, K}), "qwenvl decode_layers: ", what, " must be [",
                N, ", ", K, "], got ", shape);
    if (w->scalar_type() == at::kHalf) out.kind = WeightKind::kF16;
  } else {
    TORCH_CHECK(w->scalar_type() == at::kChar, "qwenvl decode_layers: ", what,
                " must be bfloat16, float16, int8 or int4 (uint8 blocks), got ", w->scalar_type());
    const bool rows = shape == at::IntArrayRef({N, K});
    const bool tiled = N % 8 == 0 && K % 16 == 0 &&
                       shape == at::IntArrayRef({N / 8, K / 16, 8, 16});
    TORCH_CHECK(rows || tiled, "qwenvl decode_layers: int8 ", what, " must be [", N, ", ", K,
                "] or tiled [N/8, K/16, 8, 16], got ", shape);
    out.kind = tiled ? WeightKind::kInt8Tiled : WeightKind::kInt8Rows;
    out.scale = vector_at(params, i + 1, N, "scale");
  }
  if (bias.has_value()) out.bias = vector_at(params, i + 2, N, "bias");
  return out;
}

// Start and end of thread tid's share of n units.
inline std::pair<int64_t, int64_t> share(int64_t n, int tid, int nt) {
  return {n * tid / nt, n * (tid + 1) / nt};
}

void decode_layers(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                   const Params& params, at::TensorList k_caches, at::TensorList v_caches,
                   const at::Tensor& slots, const at::Tensor& keys, const at::Tensor& lens,
                   int64_t num_heads, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 &&
                  x.is_contiguous() && x.size(0) >= 1 && x.size(0) <= kMaxM,
              "qwenvl decode_layers: x must be a contiguous float32 CPU tensor [T <= ", kMaxM,
              ", hidden], got ", x.scalar_type(), " ", x.sizes());
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(v_caches.size()) == L &&
                  static_cast<int64_t>(params.size()) == L * kParamsPerLayer,
              "qwenvl decode_layers: ", L, " key caches, ", v_caches.size(), " value caches and ",
              params.size(), " parameters (", kParamsPerLayer, " per layer)");
  const at::Tensor& kc0 = k_caches[0];
  TORCH_CHECK(kc0.dim() == 3, "qwenvl decode_layers: caches must be [slots, kv_heads, head_dim]");
  const int64_t T = x.size(0), Hd = x.size(1), S = kc0.size(0), Hkv = kc0.size(1),
                D = kc0.size(2), H = num_heads;
  for (int64_t l = 0; l < L; ++l)
    for (const at::Tensor* c : {&k_caches[l], &v_caches[l]})
      TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == at::kFloat && c->is_contiguous() &&
                      c->sizes() == kc0.sizes(),
                  "qwenvl decode_layers: every cache must be a contiguous float32 CPU tensor ",
                  kc0.sizes());
  TORCH_CHECK(H >= 1 && Hkv >= 1 && H % Hkv == 0 && D % 2 == 0,
              "qwenvl decode_layers: ", H, " heads for ", Hkv, " kv heads of dim ", D);
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  TORCH_CHECK(c.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat &&
                  c.sizes() == at::IntArrayRef({T, D}) && s.sizes() == c.sizes(),
              "qwenvl decode_layers: cos and sin must be float32 [T, D] = [", T, ", ", D, "]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && keys.scalar_type() == at::kLong &&
                  lens.scalar_type() == at::kLong && slots.numel() == T && keys.dim() == 2 &&
                  keys.size(0) == T && lens.numel() == T,
              "qwenvl decode_layers: slots [T], keys [T, W] and lens [T] must be int64");
  const at::Tensor sl = slots.contiguous(), ky = keys.contiguous(), ln = lens.contiguous();

  const int64_t Nq = (H + 2 * Hkv) * D;
  std::vector<Layer> layers(L);
  int64_t I = 0;  // intermediate size, from the first gate_up weight
  for (int64_t l = 0; l < L; ++l) {
    const int64_t p = l * kParamsPerLayer;
    Layer& ly = layers[l];
    ly.norm1 = vector_at(params, p, Hd, "input_layernorm");
    ly.qkv = weight_at(params, p + 1, Nq, Hd, "qkv_proj");
    ly.o = weight_at(params, p + 4, Hd, H * D, "o_proj");
    ly.norm2 = vector_at(params, p + 7, Hd, "post_attention_layernorm");
    if (l == 0) {
      const std::optional<at::Tensor> gu = params.get(p + 8);
      const bool blocks = gu.has_value() && gu->dim() == 3;
      TORCH_CHECK(gu.has_value() && (gu->numel() % (2 * Hd) == 0 || blocks),
                  "qwenvl decode_layers: gate_up_proj must hold [2 * intermediate, ", Hd, "]");
      I = gu->numel() / (2 * Hd);
      const std::optional<at::Tensor> dn = params.get(p + 11);
      if (blocks && dn.has_value() && dn->dim() == 3)  // down's K = groups x group size
        I = dn->size(1) * ((dn->size(2) - 32) / (dn->scalar_type() == at::kChar ? 8 : 4));
    }
    ly.gate_up = weight_at(params, p + 8, 2 * I, Hd, "gate_up_proj");
    ly.down = weight_at(params, p + 11, Hd, I, "down_proj");
  }

  // Shared stage outputs, and each thread's private normed rows, int16 rows and attention scratch.
  const at::TensorOptions f32 = x.options();
  at::Tensor qkv = at::empty({T, Nq}, f32), attn = at::empty({T, H * D}, f32),
             gu = at::empty({T, 2 * I}, f32), act = at::empty({T, I}, f32);
  DecodeAttention a{nullptr,  nullptr,  nullptr, c.data_ptr<float>(), s.data_ptr<float>(),
                    Nq,       Nq,       Nq,      nullptr,             nullptr,
                    sl.data_ptr<int64_t>(), ky.data_ptr<int64_t>(), ln.data_ptr<int64_t>(),
                    T,        H,        Hkv,     D,                   ky.size(1),
                    S,        attn.data_ptr<float>()};
  const int64_t most = check_attention_indices(a);
  float* qp = qkv.data_ptr<float>();
  a.q = qp;
  a.k = qp + H * D;
  a.v = qp + (H + Hkv) * D;
  const int nt = std::max(1, at::get_num_threads());
  const int64_t widest = std::max({Hd, H * D, I});
  std::vector<std::vector<float>> h(nt, std::vector<float>(T * Hd)),
      scratch(nt, std::vector<float>((H / Hkv) * (D + most)));
  std::vector<std::vector<int16_t>> xq(nt, std::vector<int16_t>(T * widest));
  std::vector<std::vector<float>> xs(nt, std::vector<float>(kMaxM));
  // int4: per-thread x quantised to int8 per (row, group) and each group's (scale, sum)
  std::vector<std::vector<int8_t>> xq8(nt, std::vector<int8_t>(T * widest));
  std::vector<std::vector<float>> xg(nt, std::vector<float>(T * (widest / 32 + 1) * 2));
  std::vector<float*> kp(L), vp(L);
  for (int64_t l = 0; l < L; ++l) {
    kp[l] = k_caches[l].data_ptr<float>();
    vp[l] = v_caches[l].data_ptr<float>();
  }
  float* xp = x.data_ptr<float>();
  float *gup = gu.data_ptr<float>(), *actp = act.data_ptr<float>();
  const float e = static_cast<float>(eps);

#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), n = omp_get_num_threads();
    float* hp = h[tid].data();
    // y (+)= rows @ w^T over this thread's share of w's units; int16 rows made here when needed
    auto gemv = [&](const Weight& w, const float* rows, float* y, bool accumulate) {
      Rows r{rows, nullptr, xs[tid].data(), T};
      if (wants_i16(w)) {
        quantize_rows_i16(rows, T, w.K, xq[tid].data(), xs[tid].data());
        r.xq = xq[tid].data();
      } else if (wants_i8_groups(w)) {
        quantize_rows_i8_groups(rows, T, w.K, w.group, w.perm, xq8[tid].data(), xg[tid].data());
        r.xq8 = xq8[tid].data();
        r.xg = xg[tid].data();
      }
      const auto [u0, u1] = share(gemv_units(w, T), tid, n);
      if (u0 < u1) gemv_span(w, r, y, u0, u1, accumulate);
    };
    DecodeAttention att = a;
    for (int64_t l = 0; l < L; ++l) {
      const Layer& ly = layers[l];
      rms_norm_rows(xp, ly.norm1, e, Hd, hp, 0, T);
      gemv(ly.qkv, hp, qp, false);
#pragma omp barrier
      att.k_cache = kp[l];
      att.v_cache = vp[l];
      const auto [i0, i1] = share(T * Hkv, tid, n);
      for (int64_t i = i0; i < i1; ++i) attention_task(att, i, scratch[tid].data());
#pragma omp barrier
      gemv(ly.o, a.out, xp, true);
#pragma omp barrier
      rms_norm_rows(xp, ly.norm2, e, Hd, hp, 0, T);
      gemv(ly.gate_up, hp, gup, false);
#pragma omp barrier
      const auto [j0, j1] = share(I, tid, n);
      for (int64_t t = 0; t < T; ++t)
        silu_mul_span(gup + t * 2 * I, gup + t * 2 * I + I, actp + t * I, j0, j1);
#pragma omp barrier
      gemv(ly.down, actp, xp, true);
#pragma omp barrier
    }
  }
}

}  // namespace
}  // namespace qwenvl

TORCH_LIBRARY_FRAGMENT(qwenvl_gemv, m) {
  m.def(
      "decode_layers(Tensor(a!) x, Tensor cos, Tensor sin, Tensor?[] params, Tensor(b!)[] k_caches, "
      "Tensor(c!)[] v_caches, Tensor slots, Tensor keys, Tensor lens, int num_heads, float eps) -> ()",
      &qwenvl::decode_layers);
}
