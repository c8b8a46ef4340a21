"""Rotary position embeddings: M-RoPE for the language model and the 2-D rope of the ViT.

Both return ``(cos, sin)`` tables over the full head dimension, to be used with ``apply_rotary``
(rotate-half convention: dim ``j`` pairs with ``j + head_dim/2``).
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def text_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim)
    )


def mrope_cos_sin(
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: tuple[int, ...],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimodal rope tables from three position streams.

    Args:
        positions: ``[3, *shape]`` integer positions (streams T, H, W).
        inv_freq: ``[head_dim/2]`` inverse frequencies.
        mrope_section: how many frequencies each stream owns, in order T, H, W ("chunked" layout).
        dtype: the activation dtype; the reference casts the tables to it.

    Returns:
        cos, sin of shape ``[*shape, head_dim]``.
    """
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # [3, *shape, hd/2]
    cos, sin = freqs.cos(), freqs.sin()
    parts_c, parts_s, start = [], [], 0
    for stream, n in enumerate(mrope_section):
        parts_c.append(cos[stream, ..., start : start + n])
        parts_s.append(sin[stream, ..., start : start + n])
        start += n
    cos, sin = torch.cat(parts_c, dim=-1), torch.cat(parts_s, dim=-1)
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((sin, sin), dim=-1).to(dtype)


def vision_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """``head_dim/4`` frequencies, shared by the row and the column axis."""
    half = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float, device="cpu") / half))


def vision_cos_sin(
    hw_positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rope tables for the ViT, in float32.

    Args:
        hw_positions: ``[N, 2]`` (row, column) of each patch.

    Returns:
        cos, sin of shape ``[N, head_dim]``: ``[row freqs, col freqs]`` repeated twice.
    """
    freqs = hw_positions[..., None].float() * inv_freq.to(hw_positions.device)  # [N, 2, hd/4]
    freqs = freqs.flatten(1)  # [N, hd/2]: row freqs then column freqs
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()
