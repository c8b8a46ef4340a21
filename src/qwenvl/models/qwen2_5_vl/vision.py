"""The Qwen2.5-VL vision encoder: Qwen2-VL's ViT with RMSNorm, SwiGLU and window attention.

Most blocks attend inside windows of ``window_size`` pixels (8x8 patches); the blocks listed in
``fullatt_block_indexes`` attend over the whole frame. Tokens are reordered window by window (in
whole merge units) before the blocks and restored after the merger.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenvl.layers.norm import RMSNorm
from qwenvl.models.qwen2_vl.config import VisionConfig
from qwenvl.models.qwen2_vl.vision import Grid, VisionTransformer, frame_cu_seqlens


class SwiGLU(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.embed_dim, cfg.intermediate_size)
        self.up_proj = nn.Linear(cfg.embed_dim, cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def window_plan(
    grid_thw: list[Grid], merge: int, window_units: int
) -> tuple[torch.Tensor, list[int]]:
    """Merge-unit permutation that groups windows, and the window segment boundaries in patches.

    Windows are ``window_units`` merged tokens on a side, tiled row-major per frame; edge windows
    are partial. Units inside a window stay row-major.
    """
    perm, cu, offset = [], [0], 0
    for t, h, w in grid_thw:
        lh, lw = h // merge, w // merge
        nh, nw = -(-lh // window_units), -(-lw // window_units)
        ids = torch.arange(t * lh * lw).view(t, lh, lw)
        for ti in range(t):
            for wy in range(nh):
                for wx in range(nw):
                    win = ids[
                        ti,
                        wy * window_units : (wy + 1) * window_units,
                        wx * window_units : (wx + 1) * window_units,
                    ].reshape(-1)
                    perm.append(win + offset)
                    cu.append(cu[-1] + win.numel() * merge * merge)
        offset += t * lh * lw
    return torch.cat(perm), cu


class Qwen25VisionTransformer(VisionTransformer):
    def norm_class(self) -> type[nn.Module]:
        return RMSNorm

    def make_mlp(self) -> nn.Module:
        return SwiGLU(self.cfg)

    def attention_plan(self, grid_thw: list[Grid]) -> tuple[torch.Tensor | None, list[list[int]]]:
        cfg = self.cfg
        window_units = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
        perm, cu_window = window_plan(grid_thw, cfg.spatial_merge_size, window_units)
        cu_full = frame_cu_seqlens(grid_thw)  # frames are contiguous after the permutation too
        full = set(cfg.fullatt_block_indexes)
        return perm, [cu_full if i in full else cu_window for i in range(cfg.depth)]
