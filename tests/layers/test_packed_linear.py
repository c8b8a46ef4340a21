"""PackedLinear against plain float64 matmuls on the same (bf16-rounded / dequantised) weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwenvl import kernels
from qwenvl.layers.packed_linear import PackedLinear

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="GEMV kernels not built here")


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 64])  # kernel path up to 16, GEMM path above
@pytest.mark.parametrize("bias", [False, True])
@needs_kernels
def test_bf16_matches_float64(rows: int, bias: bool) -> None:
    lin = nn.Linear(200, 70, bias=bias)
    packed = PackedLinear.from_dense(lin.weight, lin.bias, "bf16")
    x = torch.randn(rows, 200)
    w = lin.weight.detach().to(torch.bfloat16).double()
    ref = x.double() @ w.T + (lin.bias.detach().double() if bias else 0)
    out = packed(x)
    assert out.dtype == torch.float32 and out.shape == (rows, 70)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 4, 40])
@pytest.mark.parametrize("out_features", [33, 40])  # 40 rows are stored tiled (8 x 16 steps)
@needs_kernels
def test_int8_matches_dequantised_float64(rows: int, out_features: int) -> None:
    lin = nn.Linear(96, out_features)
    packed = PackedLinear.from_dense(lin.weight, lin.bias, "int8")
    tiled = out_features % 8 == 0
    assert packed.qweight.dim() == (4 if tiled else 2)
    x = torch.randn(2, rows, 96)  # leading dims are flattened and restored
    deq = packed.int8_rows().double() * packed.scale.double()[:, None]
    ref = x.double() @ deq.T + lin.bias.detach().double()
    out = packed(x)
    assert out.shape == (2, rows, out_features)
    # the AVX2 and the tiled kernels (up to 16 rows) quantise x to int16 per row: within
    # max|x| / 65534 each
    kernel = (kernels.isa() == "avx2" or tiled) and 2 * rows <= 16
    x_err = x.double().abs().amax(-1, keepdim=True) / 65534 if kernel else 0
    tol = 1e-5 + 1e-5 * ref.abs() + x_err * deq.abs().sum(1)
    assert bool(((out.double() - ref).abs() <= tol).all())
    # per-row symmetric quantisation: every weight within half a step of its original
    err = (deq - lin.weight.detach().double()).abs()
    assert bool((err <= packed.scale.double()[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("in_features,tiled", [(4096, True), (4112, False), (4100, False)])
def test_int8_layout_follows_row_length(in_features: int, tiled: bool) -> None:
    # rows up to 4 KB are tiled for the decode GEMV; longer ones (a down projection) and widths
    # off the 16-column grid stay rows; both multiply the same
    lin = nn.Linear(in_features, 16, bias=False)
    packed = PackedLinear.from_dense(lin.weight, None, "int8")
    assert packed.qweight.dim() == (4 if tiled else 2)
    assert packed.int8_rows().shape == (16, in_features)
    deq = packed.int8_rows().double() * packed.scale.double()[:, None]
    x = torch.randn(3, in_features)
    ref = x.double() @ deq.T
    tol = 1e-4 + x.double().abs().amax(-1, keepdim=True) / 65534 * deq.abs().sum(1)
    assert bool(((packed(x).double() - ref).abs() <= tol).all())


def test_packed_format_builds_only_the_decoder_from_the_checkpoint(checkpoints) -> None:
    """The bf16 format's modules, filled by the loader from the checkpoint's separate q/k/v and
    gate/up tensors, hold exactly the dense model's weights (rounded to bf16)."""
    from qwenvl.checkpoint import load_model

    folder = checkpoints("qwen2_5_vl", tie=True)
    dense, cfg = load_model(folder, dtype="float32")
    model, _ = load_model(folder, dtype="float32", weight_format="bf16")
    packed = [n for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 4 * cfg.text.num_hidden_layers + 1  # qkv o gate_up down, lm_head
    assert not any(isinstance(m, nn.Linear) for m in model.model.modules())
    linears = [type(m) for m in model.visual.modules() if isinstance(m, nn.Linear)]
    assert linears == [type(m) for m in dense.visual.modules() if isinstance(m, nn.Linear)]
    for i, layer in enumerate(model.model.layers):
        ref = dense.model.layers[i]
        a, b = ref.self_attn, ref.mlp
        qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        assert torch.equal(layer.self_attn.qkv_proj.weight, qkv.to(torch.bfloat16))
        bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        assert torch.equal(layer.self_attn.qkv_proj.bias, bias)
        gate_up = torch.cat([b.gate_proj.weight, b.up_proj.weight]).to(torch.bfloat16)
        assert torch.equal(layer.mlp.gate_up_proj.weight, gate_up)
        assert torch.equal(layer.mlp.down_proj.weight, b.down_proj.weight.to(torch.bfloat16))
    # the tied head got a bf16 copy; the embedding stays float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight.to(torch.bfloat16))


def test_bad_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="int8"):
        PackedLinear.from_dense(torch.zeros(2, 2), None, "int4")


def test_prefill_path_works_inside_and_then_outside_inference_mode() -> None:
    """The GEMM path's scratch buffer, first made under inference_mode (an engine prefill), must
    still take writes from a later call outside it (scoring, training code)."""
    lin = nn.Linear(48, 4000)  # a weight larger than any earlier test's, so the buffer is new
    packed = PackedLinear.from_dense(lin.weight, None, "bf16")
    x = torch.randn(20, 48)
    with torch.inference_mode():
        a = packed(x).clone()
    with torch.no_grad():
        b = packed(x)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_prefill_gemm_is_the_bf16_rounded_product(bias: bool) -> None:
    """``gemm_dtype = bfloat16`` (``LLM(prefill_dtype="bfloat16")``): the prefill rows multiply
    the activations rounded to bf16 by the stored weight, the product rounded to bf16 (within one
    bf16 step of float64's, the float32 accumulation deciding near a tie), the bias added in
    float32; decode rows (the GEMV kernels) stay exact."""
    from qwenvl.layers.packed_linear import set_gemm_dtype

    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=bias)
    packed = PackedLinear.from_dense(lin.weight, lin.bias, "bf16")
    assert set_gemm_dtype(nn.Sequential(packed), torch.bfloat16) == 1
    w = lin.weight.detach().to(torch.bfloat16).double()
    b = lin.bias.detach().double() if bias else 0
    x = torch.randn(40, 256)
    product = x.to(torch.bfloat16).double() @ w.T
    out = packed(x).double()
    rounded = product.to(torch.bfloat16).double()
    step = 2.0 ** (torch.floor(torch.log2(product.abs())) - 7)  # one bf16 step at each value
    assert ((out - b - rounded).abs() <= step + 1e-12).all()
    exact = x.double() @ w.T + b
    assert (out - exact).abs().max() > 1e-3  # the rounding is there (float32 GEMM: < 1e-5)
    if kernels.available():  # decode rows: GEMV kernels, float32
        torch.testing.assert_close(packed(x[:3]).double(), exact[:3], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        set_gemm_dtype(packed, torch.float16)
