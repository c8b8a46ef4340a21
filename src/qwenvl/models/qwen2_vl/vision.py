"""The Qwen2-VL vision encoder: patch embedding, 2-D rope, per-frame attention blocks, 2x2 patch
merger.

Input rows are patches in merge-window order (the processor's layout), so the 4 patches
of one merged token are consecutive rows and the merger is a plain reshape. Attention never crosses
a temporal patch group (one frame pair) or an item: ``cu_seqlens`` has one segment per (item, t).
Qwen2.5-VL subclasses this and overrides the norm, the MLP and the attention plan (windows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qwenvl.layers.attention import varlen_attention
from qwenvl.layers.rotary import apply_rotary, vision_cos_sin, vision_inv_freq
from qwenvl.models.qwen2_vl.config import VisionConfig

Grid = tuple[int, int, int]


class PatchEmbed(nn.Module):
    """A Conv3d whose stride equals its kernel is a Linear over flattened patches; we keep the
    Conv3d weight shape (so checkpoints load unchanged) and run it as a matmul, which is much
    faster.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Module()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj.weight = nn.Parameter(torch.empty(cfg.embed_dim, cfg.in_channels, *k))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixel_values.to(w.dtype), w.reshape(w.shape[0], -1))  # [N, E]


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.intermediate_size)
        self.act = QuickGELU() if cfg.hidden_act == "quick_gelu" else _activation(cfg.hidden_act)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _activation(name: str) -> nn.Module:
    table = {"silu": nn.SiLU, "gelu": nn.GELU, "quick_gelu": QuickGELU}
    if name not in table:
        raise ValueError(f"unsupported vision activation {name!r}")
    return table[name]()


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.attention_dtype = torch.float32  # layers.attention.set_attention_dtype

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: list[int]
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # [N, heads, hd] each
        # rope in float32, as the reference does, then back to the activation dtype
        q = apply_rotary(q.float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        out = varlen_attention(q, k, v, cu_seqlens, self.attention_dtype)
        return self.proj(out.reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, norm: type[nn.Module], mlp: nn.Module) -> None:
        super().__init__()
        self.norm1 = norm(cfg.embed_dim, eps=1e-6)
        self.norm2 = norm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = mlp

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: list[int]
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig, norm: type[nn.Module]) -> None:
        super().__init__()
        self.hidden = cfg.embed_dim * cfg.merge_unit
        self.ln_q = norm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden, self.hidden),
            nn.GELU(),
            nn.Linear(self.hidden, cfg.out_hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden))  # [N/4, out_hidden]


def patch_hw_positions(grid_thw: list[Grid], merge: int) -> torch.Tensor:
    """(row, column) of every patch, in the processor's merge-window row order: ``[N, 2]``."""
    out = []
    for t, h, w in grid_thw:
        rows = torch.arange(h).view(h, 1).expand(h, w)
        cols = torch.arange(w).view(1, w).expand(h, w)
        hw = torch.stack([rows, cols], dim=-1)  # [h, w, 2]
        hw = hw.view(h // merge, merge, w // merge, merge, 2).permute(0, 2, 1, 3, 4).reshape(-1, 2)
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


def frame_cu_seqlens(grid_thw: list[Grid]) -> list[int]:
    """One attention segment per temporal patch group of every item."""
    cu = [0]
    for t, h, w in grid_thw:
        for _ in range(t):
            cu.append(cu[-1] + h * w)
    return cu


class VisionTransformer(nn.Module):
    """Qwen2-VL ViT. ``forward(pixel_values [N, C*T*P*P], grid_thw) -> [N/4, out_hidden_size]``."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        norm = self.norm_class()
        self.blocks = nn.ModuleList(
            VisionBlock(cfg, norm, self.make_mlp()) for _ in range(cfg.depth)
        )
        self.merger = PatchMerger(cfg, norm)
        self.gradient_checkpointing = False  # training: keep only block inputs for backward
        self.register_buffer(
            "inv_freq", vision_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False
        )

    # --- hooks overridden by Qwen2.5-VL ---
    def norm_class(self) -> type[nn.Module]:
        return nn.LayerNorm

    def make_mlp(self) -> nn.Module:
        return VisionMlp(self.cfg)

    def attention_plan(self, grid_thw: list[Grid]) -> tuple[torch.Tensor | None, list[list[int]]]:
        """Return (merge-unit permutation or None, cu_seqlens for each block)."""
        cu = frame_cu_seqlens(grid_thw)
        return None, [cu] * self.cfg.depth

    # --- forward ---
    def forward(self, pixel_values: torch.Tensor, grid_thw: list[Grid]) -> torch.Tensor:
        grid_thw = [tuple(int(v) for v in g) for g in grid_thw]
        x = self.patch_embed(pixel_values)
        cos, sin = vision_cos_sin(
            patch_hw_positions(grid_thw, self.cfg.spatial_merge_size), self.inv_freq
        )
        perm, plan = self.attention_plan(grid_thw)
        if perm is not None:
            x, cos, sin = (_permute_units(t, perm, self.cfg.merge_unit) for t in (x, cos, sin))
        cos, sin = cos.unsqueeze(1).to(x.device), sin.unsqueeze(1).to(x.device)  # [N, 1, hd]
        for block, cu in zip(self.blocks, plan):
            if self.gradient_checkpointing and torch.is_grad_enabled():  # recompute in backward
                x = checkpoint(block, x, cos, sin, cu, use_reentrant=False)
            else:
                x = block(x, cos, sin, cu)
        out = self.merger(x)
        if perm is not None:
            out = out[torch.argsort(perm)]
        return out


def _permute_units(x: torch.Tensor, perm: torch.Tensor, unit: int) -> torch.Tensor:
    """Reorder whole merge units (``unit`` consecutive rows) by ``perm``."""
    n = x.shape[0]
    return x.view(n // unit, unit, -1)[perm.to(x.device)].reshape(n, -1)
