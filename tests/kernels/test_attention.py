"""The vision tower's bf16 attention (``attention.cpp``) against attention written out in float64.

Two truths: the exact attention of the bf16-rounded inputs (what the kernel computes up to the
rounding of its softmax weights to bf16, a relative 2^-9 each, and its exp's 4e-5), and the exact
attention of the float32 inputs (what float32 SDPA computes), which the rounding of q and k moves
further."""

from __future__ import annotations

import math

import pytest
import torch

from qwenvl import kernels


@pytest.fixture(scope="module", autouse=True)
def _need_kernels() -> None:
    if not kernels.available():
        pytest.skip("qwenvl CPU kernels unavailable (no compiler, or QWENVL_KERNELS=0)")


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).double()


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int]) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(D)) v within each segment, head by head."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for a, b in zip(cu[:-1], cu[1:]):
        for h in range(q.shape[1]):
            w = (q[a:b, h].double() @ k[a:b, h].double().T).softmax(-1)
            out[a:b, h] = w @ v[a:b, h].double()
    return out


def _inputs(n: int, heads: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v as strided views of one fused qkv output, as the vision tower hands them over."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, 3, heads, d, generator=g)
    qkv[:, :2] *= 1.5  # scores of a few units: softmax rows neither flat nor one-hot
    return qkv.unbind(1)


CASES = [  # (N, heads, head_dim, cu_seqlens): tails off the 4-row blocks and 64-key chunks,
    (37, 3, 80, [0, 5, 5, 37]),  # an empty segment,
    (70, 2, 48, [0, 1, 70]),  # a one-token segment,
    (300, 4, 128, [0, 64, 128, 200, 300]),  # windows of one chunk, the widest head,
    (130, 2, 16, [0, 130]),  # the narrowest head
    (4, 1, 32, [0, 2, 4]),
]


@pytest.mark.parametrize(("n", "heads", "d", "cu"), CASES)
def test_against_exact_attention_of_the_rounded_inputs(n, heads, d, cu) -> None:
    q, k, v = _inputs(n, heads, d, seed=n)
    got = kernels.bf16_attention(q, k, v, cu)
    assert got.shape == (n, heads, d) and got.dtype == torch.float32 and got.is_contiguous()
    # the kernel rounds q log2(e) / sqrt(D) (its softmax is in powers of 2)
    ref = _exact(_bf16(q * math.log2(math.e) / math.sqrt(d)) * math.log(2), _bf16(k), _bf16(v), cu)
    # each weight is off by at most 2^-9 relative before renormalising: within 2^-8 max|v|
    err = (got.double() - ref).abs().max() / v.abs().max()
    assert err < 2**-8, err


@pytest.mark.parametrize(("n", "heads", "d", "cu"), CASES)
def test_against_exact_float32_attention(n, heads, d, cu) -> None:
    q, k, v = _inputs(n, heads, d, seed=n + 1)
    got = kernels.bf16_attention(q, k, v, cu).double()
    ref = _exact(q / math.sqrt(d), k, v, cu)
    err = (got - ref).abs().max() / v.abs().max()
    assert err < 2**-7, err
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1), dim=-1)
    assert cos.min() > 0.9999, cos.min()


def test_equal_values_come_back_as_their_bf16_rounding() -> None:
    """Weights summing to one, whatever the scores: a segment whose values are all one vector
    returns that vector rounded to bf16 (here to 1e-6 of float32 sums)."""
    q, k, _ = _inputs(150, 2, 80, seed=7)
    row = torch.randn(2, 80, generator=torch.Generator().manual_seed(8))
    v = row.expand(150, 2, 80).contiguous()
    got = kernels.bf16_attention(q * 20, k, v, [0, 150])  # sharp rows too
    want = row.to(torch.bfloat16).float().expand(150, 2, 80)
    assert (got - want).abs().max() <= 1e-6 * row.abs().max()


def test_a_segment_sees_only_its_own_keys() -> None:
    q, k, v = _inputs(90, 2, 32, seed=9)
    cu = [0, 40, 90]
    before = kernels.bf16_attention(q, k, v, cu)
    k2, v2 = k.clone(), v.clone()
    k2[40:] += 5
    v2[40:] -= 3  # the second segment changes completely
    after = kernels.bf16_attention(q, k2, v2, cu)
    assert torch.equal(after[:40], before[:40])
    assert (after[40:] - before[40:]).abs().max() > 1


def test_bad_inputs() -> None:
    q = torch.randn(8, 2, 80)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernels.bf16_attention(
            torch.randn(8, 2, 40), torch.randn(8, 2, 40), torch.randn(8, 2, 40), [0, 8]
        )
    with pytest.raises(RuntimeError, match="from 0 to N = 8"):
        kernels.bf16_attention(q, q, q, [0, 7])
    with pytest.raises(RuntimeError, match="must not decrease"):
        kernels.bf16_attention(q, q, q, [0, 5, 3, 8])
    with pytest.raises(RuntimeError, match="float32 CPU"):
        kernels.bf16_attention(q.double(), q, q, [0, 8])
    with pytest.raises(RuntimeError, match="one shape"):
        kernels.bf16_attention(q, q[:4], q, [0, 8])


def _exact_causal(q, k, v, cu_q, cu_k) -> torch.Tensor:
    """float64 causal attention with grouped kv heads: each segment's queries are its last
    tokens and see the keys up to their own position."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    for a, b, c, e in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        n, ctx = b - a, e - c
        mask = torch.arange(ctx)[None] <= torch.arange(ctx - n, ctx)[:, None]
        for h in range(q.shape[1]):
            s = q[a:b, h].double() @ k[c:e, h // group].double().T
            w = s.masked_fill(~mask, float("-inf")).softmax(-1)
            out[a:b, h] = w @ v[c:e, h // group].double()
    return out


@pytest.mark.parametrize(
    ("heads", "kv_heads", "d", "cu_q", "cu_k"),
    [
        (12, 2, 128, [0, 150], [0, 150]),  # a whole prompt: the decoder's prefill
        (4, 4, 64, [0, 20, 37], [0, 90, 107]),  # chunks after cached prefixes, off the blocks
        (6, 3, 80, [0, 1, 70], [0, 1, 200]),  # one-token chunk; a chunk past two key chunks
    ],
)
def test_causal_grouped_against_exact_attention_of_the_rounded_inputs(
    heads, kv_heads, d, cu_q, cu_k
) -> None:
    g = torch.Generator().manual_seed(d + heads)
    q = torch.randn(cu_q[-1], heads, d, generator=g) * 1.5
    k = torch.randn(cu_k[-1], kv_heads, d, generator=g) * 1.5
    v = torch.randn(cu_k[-1], kv_heads, d, generator=g)
    got = kernels.bf16_attention(q, k, v, cu_q, cu_k, causal=True)
    assert got.shape == q.shape
    scaled = _bf16(q * math.log2(math.e) / math.sqrt(d)) * math.log(2)
    ref = _exact_causal(scaled, _bf16(k), _bf16(v), cu_q, cu_k)
    err = (got.double() - ref).abs().max() / v.abs().max()
    assert err < 2**-8, err
    # the first query of a fresh prompt sees one key: its own value, rounded
    if cu_q == cu_k:
        assert torch.equal(got[0], v[0].repeat_interleave(heads // kv_heads, 0).bfloat16().float())


def test_causal_needs_as_many_keys_as_queries() -> None:
    q = torch.randn(8, 2, 32)
    with pytest.raises(RuntimeError, match="keys >= queries"):
        kernels.bf16_attention(q, q[:4], q[:4], [0, 8], [0, 4], causal=True)
