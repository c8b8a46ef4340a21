"""The int4 GEMV and dequantisation kernels against float64 torch (every group size, tails in N,
all M, bias), and the packed layout by hand."""

from __future__ import annotations

import pytest
import torch

from qwenvl import kernels


@pytest.fixture(scope="module", autouse=True)
def _need_kernels() -> None:
    if not kernels.available():
        pytest.skip("qwenvl CPU kernels unavailable (no compiler, or QWENVL_KERNELS=0)")


def _random_int4(n: int, k: int, g: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scale = torch.rand(n, k // g, generator=gen) * 0.1 + 0.01
    minimum = -torch.rand(n, k // g, generator=gen) * 0.8
    # what the kernels hold: fp16 scale and min
    return q, scale.half().float(), minimum.half().float()


def _dequant(q, scale, minimum) -> torch.Tensor:  # float64, from the definition
    n, k = q.shape
    g = k // scale.shape[1]
    idx = torch.arange(k) // g
    return q.double() * scale.double()[:, idx] + minimum.double()[:, idx]


def _x_int8(x: torch.Tensor, g: int) -> torch.Tensor:
    """x rounded as the kernel rounds it: int8 per (row, group), scale amax / 127."""
    m, k = x.shape
    xv = x.float().view(m, k // g, g)
    s = xv.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (torch.round(xv * (1 / s)) * s).view(m, k).double()


SHAPES = [(8, 128, 128), (13, 256, 128), (40, 512, 256), (64, 64, 64), (24, 96, 32),
          (33, 1536, 128), (16, 384, 128)]  # fmt: skip


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("n,k,g", SHAPES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_int4(m: int, n: int, k: int, g: int, x_dtype, with_bias: bool) -> None:
    q, s, mn = _random_int4(n, k, g, seed=m * 100 + n + k)
    packed = kernels.pack_int4(q, s, mn)
    assert packed.shape == ((n + 7) // 8, k // g, 4 * g + 32)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(m, k, generator=gen).to(x_dtype)
    bias = torch.randn(n, generator=gen) if with_bias else None
    y = kernels.linear_int4(x, packed, n, bias)
    assert y.dtype == x_dtype and y.shape == (m, n)
    w = _dequant(q, s, mn)
    ref = _x_int8(x, g) @ w.T + (0 if bias is None else bias.double())
    # exactly the dequantised weight times the int8-rounded x, up to fp32 accumulation
    tol = 1e-5 * (_x_int8(x, g).abs() @ w.abs().T) + 1e-5
    tol = tol + (2e-2 * ref.abs() if x_dtype == torch.bfloat16 else 0)
    assert ((y.double() - ref).abs() <= tol).all()
    # and close to the unrounded x: int8 rounding is <= amax/254 an element
    exact = x.double() @ w.T + (0 if bias is None else bias.double())
    xg = x.double().view(m, k // g, g).abs().amax(-1).repeat_interleave(g, 1)
    bound = (xg / 254) @ w.abs().T + tol
    assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("n,k,g", SHAPES)
def test_dequantize_and_unpack(n: int, k: int, g: int) -> None:
    q, s, mn = _random_int4(n, k, g, seed=n + k + g)
    packed = kernels.pack_int4(q, s, mn)
    w = kernels.dequantize_int4(packed, n)
    assert w.dtype == torch.float32 and w.shape == (n, k)
    torch.testing.assert_close(w.double(), _dequant(q, s, mn), rtol=1e-6, atol=1e-6)
    q2, s2, m2 = kernels.unpack_int4(packed, n)
    assert torch.equal(q2, q) and torch.equal(s2, s) and torch.equal(m2, mn)


def test_int4_layout_by_hand() -> None:
    n, k, g = 9, 256, 128
    q = (torch.arange(n * k) % 16).to(torch.uint8).view(n, k)
    s = torch.full((n, 2), 0.5)
    m = torch.full((n, 2), -1.0)
    p = kernels.pack_int4(q, s, m)
    assert p.shape == (2, 2, 544)  # 9 rows -> 2 tiles of 8 (the second padded)
    for row in (0, 5, 8):
        t, r = divmod(row, 8)
        for col in (0, 1, 63, 64, 127, 128, 200, 255):
            grp, c = divmod(col, g)
            byte = p[t, grp, r * 64 + c % 64]
            nib = byte & 0xF if c < 64 else byte >> 4
            assert nib == q[row, col], (row, col)
    meta = p[0, 1, 512:].view(torch.float16)
    assert meta[:8].tolist() == [0.5] * 8 and meta[8:].tolist() == [-1.0] * 8
    assert (p[1, :, 64:512] == 0).all()  # padding rows are zeros


@pytest.mark.parametrize("m", [1, 5])
def test_linear_int4_extreme_values_do_not_overflow(m: int) -> None:
    # every nibble 15 against x at full int8 scale, over long groups and rows: int16 partial
    # sums (4 vpmaddubsw) and int32 group sums at their largest
    n, k, g = 16, 8192, 1024
    q = torch.full((n, k), 15, dtype=torch.uint8)
    s = torch.ones(n, k // g)
    mn = torch.zeros(n, k // g)
    x = torch.ones(m, k) * torch.arange(1, m + 1)[:, None]
    x[:, 1::2] *= -1 if m == 1 else 1
    y = kernels.linear_int4(x, kernels.pack_int4(q, s, mn), n)
    ref = x.double() @ _dequant(q, s, mn).T
    assert ((y.double() - ref).abs() <= 1e-5 * ref.abs().clamp(min=1)).all()


def test_quantize_int4_round_trip_and_refit() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 512, generator=gen) * torch.logspace(-2, 1, 64)[:, None]
    w[3] = 0  # a constant group must not divide by zero
    q, s, m = kernels.quantize_int4(w, 128, refine=0)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and s.shape == (64, 4)
    deq = _dequant(q, s, m)
    err_rtn = (deq - w.double()).square().sum()
    # round to nearest from the group's range: within half a step (+ fp16 rounding of scale/min)
    step = s.double().repeat_interleave(128, 1)
    assert ((deq - w.double()).abs() <= step * 0.5 + 1e-3 * w.double().abs().amax()).all()
    assert (deq[3] == 0).all()
    q2, s2, m2 = kernels.quantize_int4(w, 128)  # with the least-squares refit
    err_fit = (_dequant(q2, s2, m2) - w.double()).square().sum()
    assert err_fit < 0.95 * err_rtn  # measured ~0.88 on gaussian weights


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("n,k,g", [(16, 256, 128), (24, 384, 64), (8, 96, 32)])
def test_linear_int4_act_order_perm(m: int, n: int, k: int, g: int) -> None:
    """GPTQ act-order: ``y = x[:, perm] @ w.T``, the gather done inside the kernel."""
    q, s, mn = _random_int4(n, k, g, seed=k + m)
    gen = torch.Generator().manual_seed(m)
    perm = torch.randperm(k, generator=gen)
    x = torch.randn(m, k, generator=gen)
    y = kernels.linear_int4(x, kernels.pack_int4(q, s, mn), n, None, perm)
    xp = x[:, perm]
    w = _dequant(q, s, mn)
    ref = _x_int8(xp, g) @ w.T
    assert ((y.double() - ref).abs() <= 1e-5 * (_x_int8(xp, g).abs() @ w.abs().T) + 1e-5).all()
    with pytest.raises(RuntimeError, match="outside"):
        kernels.linear_int4(x, kernels.pack_int4(q, s, mn), n, None, perm + 1)
    with pytest.raises(RuntimeError, match="perm must be"):
        kernels.linear_int4(x, kernels.pack_int4(q, s, mn), n, None, perm[:-1])


def test_quantize_int4_kernel_equals_the_torch_reference() -> None:
    """The C++ quantiser and the whole-tensor torch code (the definition, run on other devices)
    choose the same integers: their sums differ only in order (double vs float), which can flip
    a refit on a tie, so a handful of groups may differ, each no worse in squared error."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(256, 1024, generator=gen) * torch.logspace(-3, 1, 256)[:, None]
    w[7, :128] = 0.25  # a constant group
    q, s, m = kernels.quantize_int4(w.bfloat16(), 128)
    q2, s2, m2 = kernels._quantize_int4_torch(w.bfloat16(), 128, 2)
    assert (s == s2).float().mean() > 0.999 and (q == q2).float().mean() > 0.9999
    err = (_dequant(q, s, m) - w.bfloat16().double()).square().view(256, 8, 128).sum(-1)
    err2 = (_dequant(q2, s2, m2) - w.bfloat16().double()).square().view(256, 8, 128).sum(-1)
    differ = (s != s2) | (m != m2)
    assert (err[differ] <= err2[differ] * (1 + 1e-6) + 1e-12).all()


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n,k,g", [(8, 128, 128), (13, 256, 128), (24, 96, 32), (40, 512, 64)])
def test_linear_8bit_groups(m: int, n: int, k: int, g: int) -> None:
    """GPTQ-Int8 blocks: ``w = q * scale + min`` with q in 0..255 (0 and 255 included: stored
    as -128 and 127), by the definition in float64 with x rounded as the kernel rounds it."""
    gen = torch.Generator().manual_seed(n + k + m)
    q = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.int32).to(torch.uint8)
    q[0, :] = 0
    q[1 % n, :] = 255
    s = (torch.rand(n, k // g, generator=gen) * 0.01 + 1e-3).half().float()
    mn = -128 * s  # symmetric GPTQ: zero point 128
    mn[-1] = -100 * s[-1]  # and an asymmetric row
    packed = kernels.pack_int8_groups(q, s, mn)
    assert packed.dtype == torch.int8 and packed.shape == ((n + 7) // 8, k // g, 8 * g + 32)
    w = _dequant(q, s, mn)
    # stored: q - 128 and fp16(min + 128 scale): exact for the symmetric rows, fp16-rounded min
    # (<= 2^-11 relative) for the asymmetric one
    stored = (q.double() - 128) * s.double().repeat_interleave(g, 1)
    stored += (mn.double() + 128 * s.double()).half().double().repeat_interleave(g, 1)
    assert torch.equal(stored[:-1], w[:-1])
    w = stored
    assert torch.allclose(kernels.dequantize_int4(packed, n).double(), w, rtol=0, atol=1e-7)
    x = torch.randn(m, k, generator=gen)
    x[0, :g] = torch.where(x[0, :g] > 0, 1.0, -1.0)  # |x| hits 127 after rounding
    y = kernels.linear_int4(x, packed, n)
    ref = _x_int8(x, g) @ w.T
    assert ((y.double() - ref).abs() <= 1e-5 * (_x_int8(x, g).abs() @ w.abs().T) + 1e-5).all()


def test_bad_inputs() -> None:
    q, s, mn = _random_int4(8, 256, 128, 0)
    p = kernels.pack_int4(q, s, mn)
    with pytest.raises(RuntimeError, match="K = 256|x must be"):
        kernels.linear_int4(torch.zeros(1, 128), p, 8)
    with pytest.raises(RuntimeError, match="x must be"):
        kernels.linear_int4(torch.zeros(17, 256), p, 8)
    with pytest.raises(RuntimeError, match="tiles of 8"):
        kernels.linear_int4(torch.zeros(1, 256), p, 9)
    with pytest.raises(RuntimeError, match="uint8"):
        kernels.linear_int4(torch.zeros(1, 256), p.to(torch.int32), 8)
    with pytest.raises(ValueError, match="group"):
        kernels.pack_int4(q[:, :96], s[:, :1], mn[:, :1])
