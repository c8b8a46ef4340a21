"""The vision tower's block-diagonal attention against attention written out per segment."""

from __future__ import annotations

import math

import torch

from qwenvl.layers.attention import varlen_attention


def _by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int]) -> torch.Tensor:
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1], cu[1:]):
        for h in range(q.shape[1]):
            w = (q[a:b, h] @ k[a:b, h].T / math.sqrt(q.shape[2])).softmax(-1)
            out[a:b, h] = w @ v[a:b, h]
    return out


def test_segments_attend_only_within_themselves() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(12, 2, 8) for _ in range(3))
    cu = [0, 3, 7, 9, 12]  # lengths 3, 4, 2, 3: several segments share a length
    assert (varlen_attention(q, k, v, cu) - _by_hand(q, k, v, cu)).abs().max() < 1e-5


def test_under_bf16_autocast_as_the_trainer_runs_on_a_gpu() -> None:
    """bf16 autocast makes the attention bf16 while q stays float32: the result takes the
    attention's dtype (it used to fail writing bf16 into a float32 buffer, first seen on a GPU)."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(12, 2, 8) for _ in range(3))
    cu = [0, 3, 7, 9, 12]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = varlen_attention(q, k, v, cu)
    assert got.dtype == torch.bfloat16
    assert (got.float() - _by_hand(q, k, v, cu)).abs().max() < 3e-2
