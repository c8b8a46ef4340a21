"""CPU decode GEMV kernels against an fp64 torch reference (tails in K and N, all M, bias)."""

from __future__ import annotations

import pytest
import torch

from qwenvl import kernels


@pytest.fixture(scope="module", autouse=True)
def _need_kernels() -> None:
    if not kernels.available():
        pytest.skip("qwenvl CPU kernels unavailable (no compiler, or QWENVL_KERNELS=0)")


SHAPES = [(1, 3), (257, 1537), (64, 8), (9, 40), (64, 48), (24, 2064), (16, 4640), (12, 6200)]
# (N, K): tails, exact widths, and multiples of the 8 x 16 int8 tile (one and more than one K
# block: 1024 wide for bf16 and tiled int8, 4096 for int8 rows); one x row reads rows up to 12 KB
# in row order and longer ones (6200 bf16) in 8-row tiles


def _ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
def test_linear_bf16(m: int, n: int, k: int, x_dtype, with_bias: bool, w_dtype) -> None:
    """16-bit weights: bf16 (the CPU default) and fp16 (the AWQ/GPTQ releases' head), widened
    exactly (fp16 with vcvtph2ps, subnormals included)."""
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).to(x_dtype)
    w = torch.randn(n, k, generator=g).to(w_dtype)
    if w_dtype == torch.float16:
        w[0, : min(k, 5)] = torch.tensor([6e-8, -3e-6, 6e-5, 100.0, -1e-7])[: min(k, 5)].half()
    bias = torch.randn(n, generator=g).bfloat16() if with_bias else None
    y = kernels.linear_bf16(x, w, bias)
    assert y.dtype == x_dtype and y.shape == (m, n)
    ref = _ref(x, w, bias)
    # fp32 accumulation: error ~ eps32 * sqrt(K) * |x||w|; a bf16 output adds its own rounding
    tol = 1e-4 * k**0.5 + (2e-2 * ref.abs() if x_dtype == torch.bfloat16 else 0)
    assert ((y.double() - ref).abs() <= tol).all()


@pytest.mark.parametrize("m", [1, 3, 4, 16])
@pytest.mark.parametrize(
    "n,k,tiled",
    [(n, k, False) for n, k in SHAPES]
    + [(n, k, True) for n, k in SHAPES if kernels.can_tile(n, k)],
)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_int8(
    m: int, n: int, k: int, tiled: bool, x_dtype: torch.dtype, with_bias: bool
) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n + k + 7)
    x = torch.randn(m, k, generator=g).to(x_dtype)
    q, scale = kernels.quantize_int8(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g) if with_bias else None
    y = kernels.linear_int8(x, kernels.tile_int8(q) if tiled else q, scale, bias)
    assert y.dtype == x_dtype and y.shape == (m, n)
    w = q.double() * scale.double()[:, None]
    ref = _ref(x, w, bias)
    # on AVX2 and in the tiled kernel, x is quantised to int16 per row (rounding error <=
    # max|x| / 65534 an element), a bound far below the int8 weights' own; elsewhere the fp32
    # accumulation bound alone
    int16 = tiled or kernels.isa() == "avx2"
    x_err = x.double().abs().amax(1, keepdim=True) / 65534 if int16 else 0
    tol = 1e-4 * k**0.5 + x_err * w.abs().sum(1)[None, :]
    tol = tol + (2e-2 * ref.abs() if x_dtype == torch.bfloat16 else 0)
    assert ((y.double() - ref).abs() <= tol).all()


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("m", [1, 5])
def test_linear_int8_extreme_values_do_not_overflow(tiled: bool, m: int) -> None:
    # every product at its largest (|-128 * 32767|, x quantised to int16 at full scale) in the
    # same accumulator lane, over K large enough for several blocks of int32 accumulation: a
    # block too long for int32 would wrap around and give a wrong sign or size
    k = 8208 if tiled else 8213
    q = torch.full((16, k), -128, dtype=torch.int8)
    q[1::2] = 127
    scale = torch.linspace(0.5, 2.0, 16)
    x = torch.ones(m, k) * torch.arange(1, m + 1)[:, None]
    y = kernels.linear_int8(x, kernels.tile_int8(q) if tiled else q, scale)
    ref = _ref(x, q.double() * scale.double()[:, None], None)
    assert ((y.double() - ref).abs() <= 1e-5 * ref.abs()).all()


def test_tile_int8_layout_by_hand() -> None:
    q = torch.arange(16 * 32, dtype=torch.int32).remainder(251).sub(125).to(torch.int8).view(16, 32)
    t = kernels.tile_int8(q)
    assert t.shape == (2, 2, 8, 16)
    for n in range(16):
        for k in range(32):  # row n, column k sits at tile n // 8, step k // 16
            assert t[n // 8, k // 16, n % 8, k % 16] == q[n, k]
    assert torch.equal(kernels.untile_int8(t), q)
    with pytest.raises(ValueError, match="N % 8"):
        kernels.tile_int8(q[:15])


def test_quantize_int8_round_trip() -> None:
    w = torch.randn(33, 100) * torch.logspace(-3, 2, 33)[:, None]
    w[5] = 0  # an all-zero row must not divide by zero
    q, s = kernels.quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (33,)
    assert q.abs().max() <= 127 and (q[5] == 0).all()
    err = (w.double() - q.double() * s.double()[:, None]).abs()
    assert (err <= s.double()[:, None] * (0.5 + 1e-5)).all()  # rounding to the nearest step
    assert (q.abs().amax(dim=1)[torch.arange(33) != 5] == 127).all()  # the full range is used


def test_bad_inputs() -> None:
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="M must be"):
        kernels.linear_bf16(torch.zeros(17, 8), w)
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernels.linear_bf16(torch.zeros(1, 8), w.float())
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.linear_bf16(torch.zeros(1, 8, dtype=torch.float64), w)
    with pytest.raises(RuntimeError, match="K mismatch"):
        kernels.linear_bf16(torch.zeros(1, 9), w)
    with pytest.raises(RuntimeError, match="bias"):
        kernels.linear_bf16(torch.zeros(1, 8), w, torch.zeros(5))
    q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="int8"):
        kernels.linear_int8(torch.zeros(1, 8), q.float(), torch.ones(4))
    with pytest.raises(RuntimeError, match="scale"):
        kernels.linear_int8(torch.zeros(1, 8), q, torch.ones(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="M must be"):
        kernels.linear_int8(torch.zeros(17, 8), q, torch.ones(4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8, torch.float32])
def test_huge_page_copy_is_an_aligned_owned_copy(dtype) -> None:
    src = (torch.randn(1500, 1500) * 50).to(dtype)  # >= 2 MB for every dtype here
    copy = kernels.huge_page_copy(src)
    assert copy.data_ptr() % kernels.HUGE_PAGE == 0 and copy.is_contiguous()
    assert copy.dtype == dtype and torch.equal(copy, src)
    expected = src.clone()
    del src  # the copy owns its memory
    assert torch.equal(copy, expected)
    small = torch.randn(10)
    assert kernels.huge_page_copy(small) is small  # below one huge page: left as it is
