"""Int4Linear against a float64 dequantise-and-matmul written here from its definition:
``w[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]``, ``y = x[..., perm] @ w.T + b``."""

from __future__ import annotations

import pytest
import torch

from qwenvl import kernels
from qwenvl.layers.int4_linear import Int4Linear


def _reference_weight(q, scales, zeros) -> torch.Tensor:
    n, k = q.shape
    g = k // scales.shape[1]
    w = torch.empty(n, k, dtype=torch.float64)
    for j in range(k // g):
        cols = slice(j * g, (j + 1) * g)
        w[:, cols] = (q[:, cols].double() - zeros[:, j : j + 1].double()) * scales[
            :, j : j + 1
        ].double()
    return w


def _quantized(n: int, k: int, g: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // g, generator=gen) * 0.05 + 0.005).half().float()
    zeros = torch.randint(0, 16, (n, k // g), generator=gen).float()
    return q, scales, zeros


def _bound(x: torch.Tensor, w: torch.Tensor, g: int) -> torch.Tensor:
    """|error| bound: x rounded to int8 per (row, group) (<= amax/254 an element), fp16 scales
    and mins (relative 2^-11 of |q * s| and |zero * s|), fp32 accumulation."""
    m, k = x.shape
    xa = x.double().view(m, k // g, g).abs().amax(-1).repeat_interleave(g, 1)
    return (xa / 254) @ w.abs().T + x.double().abs() @ (w.abs().T * 1e-3 + 1e-4) + 1e-4


@pytest.mark.parametrize("rows", [1, 4, 16, 40, 70])  # GEMV kernel (chunks of 16), then GEMM
@pytest.mark.parametrize("with_perm", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_load_quantized_matches_the_definition(rows: int, with_perm: bool, with_bias: bool):
    n, k, g = 72, 384, 128
    q, scales, zeros = _quantized(n, k, g, seed=rows)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(n, generator=gen) if with_bias else None
    perm = torch.randperm(k, generator=gen) if with_perm else None
    with torch.device("meta"):
        layer = Int4Linear(k, n, bias=with_bias, group_size=g)
    layer.load_quantized(q, scales, zeros, bias=bias, perm=perm)
    w = _reference_weight(q, scales, zeros)
    # scale and min = -zero * scale are stored in fp16: relative 2^-11 of each term
    terms = _reference_weight(q, scales, -zeros).abs()  # |q * s| + |zero * s|
    err = (layer.dense_weight(torch.float32).double() - w).abs()
    assert (err <= terms * 2**-11).all()
    x = torch.randn(2, rows, k, generator=gen)
    y = layer(x)
    assert y.shape == (2, rows, n) and y.dtype == torch.float32
    xp = x if perm is None else x[..., perm]
    ref = xp.double() @ w.T + (0 if bias is None else bias.double())
    err = (y.double() - ref).abs().reshape(-1, n)
    assert (err <= _bound(xp.reshape(-1, k), w, g)).all()


def test_quantise_at_load_matches_the_definition_and_is_close_to_the_weight() -> None:
    gen = torch.Generator().manual_seed(0)
    n, k = 48, 512
    parts = {"a": 16, "b": 32}
    w16 = (torch.randn(n, k, generator=gen) * 0.02).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16()
    with torch.device("meta"):
        layer = Int4Linear(k, n, bias=True, parts=parts)
    targets = layer.allocate("cpu", torch.bfloat16)
    assert set(targets) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    targets["a.weight"].copy_(w16[:16])
    targets["b.weight"].copy_(w16[16:])
    targets["a.bias"].copy_(b[:16])
    targets["b.bias"].copy_(b[16:])
    layer.finish_loading()
    # the stored (q, scale, min) define the weight; recompute it from them by the definition
    q, s, m = kernels.unpack_int4(layer.packed, n)
    zeros = -m / s  # min = -zero * scale
    w = _reference_weight(q, s, zeros)
    torch.testing.assert_close(layer.dense_weight(torch.float32).double(), w, rtol=1e-5, atol=1e-6)
    # no worse than round-to-nearest over each group's [min, max] (computed here): smaller
    # squared error, and every weight within one such step (the refit may clip the extremes)
    wg = w16.double().view(n, k // 128, 128)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    rtn_step = (hi - lo) / 15
    rtn = (torch.round((wg - lo) / rtn_step) * rtn_step + lo).view(n, k)
    mse, mse_rtn = (w - w16.double()).square().mean(), (rtn - w16.double()).square().mean()
    assert mse < 0.95 * mse_rtn, (mse, mse_rtn)
    assert ((w - w16.double()).abs() <= rtn_step.repeat_interleave(128, 1).view(n, k)).all()
    for rows in (1, 3, 20):
        x = torch.randn(rows, k, generator=gen)
        ref = x.double() @ w.T + b.double()
        assert ((layer(x).double() - ref).abs() <= _bound(x, w, 128)).all()


def test_from_dense_bf16_input_and_fused_step_params() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(24, 256, generator=gen)
    layer = Int4Linear.from_dense(w, None)
    packed, scale, bias = layer.kernel_params()
    assert packed.dtype == torch.uint8 and scale is None and bias is None
    x = torch.randn(2, 256, generator=gen).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    wd = layer.dense_weight(torch.float32).double()
    ref = x.double() @ wd.T
    assert ((y.double() - ref).abs() <= _bound(x, wd, 128) + 2**-8 * ref.abs()).all()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="group"):
        Int4Linear(100, 8, bias=False)
    with pytest.raises(ValueError, match="parts"):
        Int4Linear(128, 8, bias=False, parts={"a": 3})
    layer = Int4Linear(128, 8, bias=False)
    q, s, z = _quantized(8, 128, 128, 0)
    with pytest.raises(ValueError, match="q must be"):
        layer.load_quantized(q[:4], s, z)
    with pytest.raises(ValueError, match="0..15"):
        layer.load_quantized(q | 16, s, z)
    with pytest.raises(ValueError, match="scales"):
        layer.load_quantized(q, s[:, :0], z)
    with pytest.raises(ValueError, match="permutation"):
        layer.load_quantized(q, s, z, perm=torch.zeros(128, dtype=torch.long))
    layer.load_quantized(q, s, z, perm=torch.arange(128).flip(0))
    assert torch.equal(layer.kernel_params()[1], torch.arange(128).flip(0))  # the fused step's
