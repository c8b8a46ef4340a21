"""The decode step's CPU ops (``decode.cpp``) and the fused decoder layers (``layers.cpp``)
against float64 math written out here."""

from __future__ import annotations

import math

import pytest
import torch

from qwenvl import kernels
from qwenvl.layers.int4_linear import Int4Linear, Int8GroupLinear
from qwenvl.layers.packed_linear import PackedLinear


@pytest.fixture(scope="module", autouse=True)
def _need_kernels() -> None:
    if not kernels.available():
        pytest.skip("qwenvl CPU kernels unavailable (no compiler, or QWENVL_KERNELS=0)")


@pytest.mark.parametrize("shape", [(1, 1536), (3, 7), (2, 5, 40), (300, 1280), (4, 0)])
def test_rms_norm(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    y = kernels.rms_norm(x, w, 1e-6)
    xd = x.double()
    ref = w.double() * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-6)


def test_rms_norm_strided_input_and_eps() -> None:
    x = torch.randn(6, 64)[:, ::2]  # not contiguous
    w = torch.rand(32)
    y = kernels.rms_norm(x, w, 0.5)
    ref = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 0.5)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 17920), (3, 2, 10), (1, 1, 6)])
def test_silu_mul(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 4
    y = kernels.silu_mul(x)
    gate, up = x.double().chunk(2, dim=-1)
    ref = gate / (1 + torch.exp(-gate)) * up
    assert y.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 64), (3, 17920), (5, 2, 18)])
def test_silu_mul_bf16_in_and_out(shape: tuple[int, ...]) -> None:
    """bf16 in (the packed gate's output under bf16 prefill), float32 inside, bf16 out: the float64
    result rounded to bf16, but for a float32 result that rounds the other way at a tie."""
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 4).bfloat16()
    y = kernels.silu_mul(x)
    gate, up = x.double().chunk(2, dim=-1)
    ref = (gate / (1 + torch.exp(-gate)) * up).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert (y == ref).float().mean() > 0.99
    ulp = 2.0 ** (torch.frexp(ref.double())[1] - 8)  # one bf16 step at ref's magnitude
    assert ((y.double() - ref.double()).abs() <= ulp).all()


def test_bad_inputs_give_clear_errors() -> None:
    with pytest.raises(RuntimeError, match="float32 CPU tensor"):
        kernels.rms_norm(torch.randn(2, 4).bfloat16(), torch.ones(4), 1e-6)
    with pytest.raises(RuntimeError, match="weight must be"):
        kernels.rms_norm(torch.randn(2, 4), torch.ones(5), 1e-6)
    with pytest.raises(RuntimeError, match="must be even"):
        kernels.silu_mul(torch.randn(2, 5))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary in float64: x [..., D], cos/sin broadcastable."""
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin


def _case(t: int, heads: int, kv_heads: int, d: int, ctx: list[int], seed: int = 0):
    """Random decode inputs: ``t`` tokens, token i with ``ctx[i]`` keys (its own slot last), q/k/v
    as strided views of one fused projection output, as the packed model produces them."""
    g = torch.Generator().manual_seed(seed)
    slots_total = 64
    k_cache = torch.randn(slots_total, kv_heads, d, generator=g)
    v_cache = torch.randn(slots_total, kv_heads, d, generator=g)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=g)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], -1)
    ang = torch.rand(t, d // 2, generator=g) * 10
    cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)
    perm = torch.randperm(slots_total, generator=g)
    keys = torch.zeros(t, max(ctx), dtype=torch.long)
    slots = torch.empty(t, dtype=torch.long)
    used = 0
    for i, n in enumerate(ctx):  # disjoint key sets: one sequence per token
        keys[i, :n] = perm[used : used + n]
        slots[i] = keys[i, n - 1]
        used += n
    return q, k, v, cos, sin, k_cache, v_cache, slots, keys, torch.tensor(ctx)


def _reference(q, k, v, cos, sin, k_cache, v_cache, slots, keys, lens):
    """Float64: caches after the writes, and the attention output [T, H*D]."""
    t, d = cos.shape
    kv_heads = k_cache.shape[1]
    heads = q.shape[1] // d
    kc, vc = k_cache.double().clone(), v_cache.double().clone()
    c, s = cos.double()[:, None], sin.double()[:, None]
    kc[slots] = _rotate(k.double().view(t, kv_heads, d), c, s)
    vc[slots] = v.double().view(t, kv_heads, d)
    qr = _rotate(q.double().view(t, heads, d), c, s)
    out = torch.empty(t, heads, d, dtype=torch.float64)
    for i in range(t):
        ks, vs = kc[keys[i, : lens[i]]], vc[keys[i, : lens[i]]]  # [n, Hkv, D]
        for h in range(heads):
            g = h // (heads // kv_heads)
            p = torch.softmax(ks[:, g] @ qr[i, h] / math.sqrt(d), 0)
            out[i, h] = p @ vs[:, g]
    return kc, vc, out.view(t, heads * d)


@pytest.mark.parametrize(
    "t,heads,kv_heads,d,ctx",
    [
        (1, 12, 2, 128, [13]),
        (3, 4, 2, 16, [1, 7, 20]),
        (2, 6, 6, 24, [5, 2]),
        (4, 8, 1, 8, [3] * 4),
    ],
)
def test_decode_attention(t: int, heads: int, kv_heads: int, d: int, ctx: list[int]) -> None:
    args = _case(t, heads, kv_heads, d, ctx)
    kc_ref, vc_ref, ref = _reference(*args)
    out = kernels.decode_attention(*args)
    k_cache, v_cache = args[5], args[6]
    assert out.shape == (t, heads * d)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(k_cache.double(), kc_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(v_cache.double(), vc_ref)


def test_decode_attention_rejects_bad_slots_and_lengths() -> None:
    q, k, v, cos, sin, kc, vc, slots, keys, lens = _case(2, 4, 2, 8, [3, 4])
    before = kc.clone()
    with pytest.raises(RuntimeError, match="slot out of range"):
        kernels.decode_attention(q, k, v, cos, sin, kc, vc, slots + 1000, keys, lens)
    with pytest.raises(RuntimeError, match="key count"):
        kernels.decode_attention(q, k, v, cos, sin, kc, vc, slots, keys, lens * 0)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.decode_attention(q.double(), k, v, cos, sin, kc, vc, slots, keys, lens)
    assert torch.equal(kc, before)  # checked before anything is written


def test_applies_only_to_untracked_float32_cpu_tensors() -> None:
    x = torch.randn(2, 4)
    assert kernels.applies(x)
    assert not kernels.applies(x.bfloat16())
    w = torch.randn(4, requires_grad=True)
    assert not kernels.applies(x, w)
    with torch.no_grad():
        assert kernels.applies(x, w)


# --- decode_layers: a packed decoder's layers for one decode step in one call -------------------
def _decoder(layers: int, hidden: int, heads: int, kv_heads: int, d: int, inter: int, mode: str):
    """Random packed layers as the ``cpu_kernels`` decoder backend passes them: per layer 14 params
    (norm1, qkv w/scale/bias, o, norm2, gate_up, down), plus the float64 weights they hold."""
    g = torch.Generator().manual_seed(layers + hidden + inter)

    def linear(n: int, k: int, bias: bool):
        w = torch.randn(n, k, generator=g) / math.sqrt(k)
        b = torch.randn(n, generator=g) * 0.1 if bias else None
        if mode.startswith("int4"):  # groups of 128, 64 or 32 columns: whichever divides k
            p4 = Int4Linear.from_dense(w, b, next(gs for gs in (128, 64, 32) if k % gs == 0))
            dense = p4.dense_weight(torch.float32).double()
            if mode == "int4_perm":  # GPTQ act-order: y = x[:, perm] @ dense.T
                p4.perm = torch.randperm(k, generator=g)
                dense = torch.zeros_like(dense).index_copy_(1, p4.perm, dense)
            return list(p4.kernel_params()), (dense, None if b is None else p4.bias.double())
        if mode == "int8g":  # GPTQ-Int8 groups of 32: symmetric 8-bit from the definition
            s = (w.view(n, k // 32, 32).abs().amax(-1) / 127).half().float()
            q = torch.round(w / s.repeat_interleave(32, 1)) + 128
            p8 = Int8GroupLinear(k, n, b is not None, 32)
            p8.load_quantized(q.to(torch.uint8), s, torch.full_like(s, 128), bias=b)
            dense = p8.dense_weight(torch.float32).double()
            return list(p8.kernel_params()), (dense, None if b is None else p8.bias.double())
        p = PackedLinear.from_dense(w, b, mode)
        dense = p.int8_rows().double() * p.scale.double()[:, None] if mode == "int8" else None
        dense = p.weight.double() if dense is None else dense
        return list(p.kernel_params()), (dense, None if b is None else p.bias.double())

    params, ref = [], []
    for _ in range(layers):
        n1, n2 = (1 + 0.1 * torch.randn(hidden, generator=g) for _ in range(2))
        qkv, qkv_ref = linear((heads + 2 * kv_heads) * d, hidden, True)
        o, o_ref = linear(hidden, heads * d, False)
        gu, gu_ref = linear(2 * inter, hidden, False)
        down, down_ref = linear(hidden, inter, False)
        params += [n1, *qkv, *o, n2, *gu, *down]
        ref.append((n1.double(), qkv_ref, o_ref, n2.double(), gu_ref, down_ref))
    return params, ref


def _decoder_reference(x, cos, sin, ref, k_caches, v_caches, slots, keys, lens, heads, eps):
    """Float64 layers: RMSNorm, q/k/v with bias, attention (``_reference``), residuals, SwiGLU."""
    x = x.double()
    d = cos.shape[1]
    kv_heads = k_caches[0].shape[1]

    def norm(v, w):
        return w * v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)

    def lin(v, wb):
        w, b = wb
        return v @ w.T + (0 if b is None else b)

    kcs, vcs = [], []
    for i, (n1, qkv, o, n2, gu, down) in enumerate(ref):
        q, k, v = lin(norm(x, n1), qkv).split([heads * d, kv_heads * d, kv_heads * d], -1)
        kc, vc, attn = _reference(q, k, v, cos, sin, k_caches[i], v_caches[i], slots, keys, lens)
        kcs.append(kc)
        vcs.append(vc)
        x = x + lin(attn, o)
        g_, u = lin(norm(x, n2), gu).chunk(2, -1)
        x = x + lin(g_ / (1 + torch.exp(-g_)) * u, down)
    return x, kcs, vcs


@pytest.mark.parametrize(
    "mode,t,hidden,heads,kv_heads,d,inter,ctx",
    [
        ("bf16", 1, 64, 4, 2, 16, 96, [9]),
        ("bf16", 3, 48, 6, 3, 8, 40, [1, 5, 12]),  # leftover rows (N % 8), odd K
        ("int8", 2, 64, 4, 2, 16, 96, [4, 7]),  # tiled int8 (N % 8 == 0, K % 16 == 0)
        ("int8", 1, 40, 4, 1, 10, 36, [6]),  # row-layout int8 (K = 40 is not a multiple of 16)
        ("int4", 2, 64, 4, 2, 16, 128, [4, 7]),  # groups of 64 (AVX2) and 128
        ("int4", 3, 128, 4, 2, 32, 96, [1, 5, 12]),  # groups of 128, and 32 (scalar) in down
        ("int4_perm", 2, 128, 4, 2, 32, 256, [3, 9]),  # act-order: x[:, perm] in every linear
        ("int8g", 2, 64, 4, 2, 16, 96, [4, 7]),  # GPTQ-Int8 blocks
    ],
)
def test_decode_layers_match_float64(mode, t, hidden, heads, kv_heads, d, inter, ctx) -> None:
    layers, eps = 3, 1e-6
    params, ref = _decoder(layers, hidden, heads, kv_heads, d, inter, mode)
    cases = [_case(t, heads, kv_heads, d, ctx, seed=i) for i in range(layers)]
    _, _, _, cos, sin, _, _, slots, keys, lens = cases[0]
    k_caches, v_caches = [c[5] for c in cases], [c[6] for c in cases]
    x = torch.randn(t, hidden, generator=torch.Generator().manual_seed(7))
    want, kc_ref, vc_ref = _decoder_reference(
        x, cos, sin, ref, k_caches, v_caches, slots, keys, lens, heads, eps
    )
    out = x.clone()
    kernels.decode_layers(out, cos, sin, params, k_caches, v_caches, slots, keys, lens, heads, eps)
    # int8: x is multiplied as int16 (relative error <= 1/65534 of the row's largest value)
    # int4: x is rounded to int8 per (row, group) (<= 1/254 of the group's largest value)
    tol = {"bf16": 1e-5, "int8": 2e-4, "int4": 3e-2, "int4_perm": 3e-2, "int8g": 3e-2}[
        mode
    ]  # int4: 3 layers
    scale = want.abs().max().item()
    assert torch.allclose(out.double(), want, rtol=tol, atol=tol * scale)
    for got, exp in zip(k_caches + v_caches, kc_ref + vc_ref):
        assert torch.allclose(got.double(), exp, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4", "int4_perm", "int8g"])
def test_decode_layers_equal_the_single_ops_bit_for_bit(mode) -> None:
    """The fused call runs the same functions as the single ops, only threads split differently:
    every output is computed the same way, so the results are identical."""
    heads, kv_heads, d, hidden, inter, t = 8, 2, 16, 128, 192, 2
    params, _ = _decoder(2, hidden, heads, kv_heads, d, inter, mode)
    cases = [_case(t, heads, kv_heads, d, [5, 9], seed=i) for i in range(2)]
    _, _, _, cos, sin, _, _, slots, keys, lens = cases[0]
    x = torch.randn(t, hidden)
    caches = [[c[5].clone() for c in cases], [c[6].clone() for c in cases]]

    def mm(h, w, scale, bias):
        if mode == "int8":
            return kernels.linear_int8(h, w, scale, bias)
        if mode.startswith("int4") or mode == "int8g":  # N % 8 == 0; scale slot: the perm
            return kernels.linear_int4(h, w, w.shape[0] * 8, bias, scale)
        return kernels.linear_bf16(h, w, bias)

    y = x.clone()
    for i in range(2):
        p = params[14 * i : 14 * (i + 1)]
        q, k, v = mm(kernels.rms_norm(y, p[0], 1e-6), *p[1:4]).split(
            [heads * d, kv_heads * d, kv_heads * d], -1
        )
        kc, vc = caches[0][i], caches[1][i]
        attn = kernels.decode_attention(q, k, v, cos, sin, kc, vc, slots, keys, lens)
        y = y + mm(attn, *p[4:7])
        y = y + mm(kernels.silu_mul(mm(kernels.rms_norm(y, p[7], 1e-6), *p[8:11])), *p[11:14])
    out = x.clone()
    k_caches, v_caches = [c[5] for c in cases], [c[6] for c in cases]
    kernels.decode_layers(out, cos, sin, params, k_caches, v_caches, slots, keys, lens, heads, 1e-6)
    assert torch.equal(out, y)
    assert all(torch.equal(a, b) for a, b in zip(k_caches + v_caches, caches[0] + caches[1]))


def test_decode_layers_reject_bad_input_before_writing() -> None:
    heads, kv_heads, d, hidden, inter = 4, 2, 8, 32, 48
    params, _ = _decoder(2, hidden, heads, kv_heads, d, inter, "bf16")
    cases = [_case(1, heads, kv_heads, d, [4], seed=i) for i in range(2)]
    _, _, _, cos, sin, _, _, slots, keys, lens = cases[0]
    k_caches, v_caches = [c[5] for c in cases], [c[6] for c in cases]
    x = torch.randn(1, hidden)
    before = [x.clone(), *(c.clone() for c in k_caches + v_caches)]

    def call(params=params, x=x, slots=slots, heads=heads, caches=k_caches):
        kernels.decode_layers(x, cos, sin, params, caches, v_caches, slots, keys, lens, heads, 1e-6)

    with pytest.raises(RuntimeError, match="14 per layer"):
        call(params=params[:-1])
    with pytest.raises(RuntimeError, match="must be \\[32, 32\\]"):  # o_proj of the wrong shape
        call(params=params[:4] + [params[4][:, :16].contiguous()] + params[5:])
    with pytest.raises(RuntimeError, match="bfloat16, float16, int8 or int4"):
        call(params=params[:1] + [params[1].float()] + params[2:])
    with pytest.raises(RuntimeError, match="slot out of range"):
        call(slots=slots + 1000)
    with pytest.raises(RuntimeError, match="heads"):
        call(heads=3)
    with pytest.raises(RuntimeError, match="caches"):
        call(caches=k_caches[:1])
    with pytest.raises(RuntimeError, match="T <= 16"):
        call(x=torch.randn(17, hidden))
    after = [x, *k_caches, *v_caches]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
