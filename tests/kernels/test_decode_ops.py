"""The decode step's small CPU ops (``decode.cpp``) against float64 math written out here."""

from __future__ import annotations

import math

import pytest
import torch

from qwenvl import kernels


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
