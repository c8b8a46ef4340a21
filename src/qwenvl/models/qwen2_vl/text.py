"""The Qwen2 decoder with M-RoPE: GQA attention with q/k/v biases, SwiGLU MLP, RMSNorm.

Module and parameter names equal the checkpoint's (``model.layers.{i}.self_attn.q_proj``...), so
state dicts load without renaming and LoRA adapters target the names users know. A compact weight
format (``qwenvl.models.formats``) builds fused ``qkv_proj`` / ``gate_up_proj`` modules instead,
which the loader fills from the same checkpoint names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qwenvl.layers.activation import silu_and_mul
from qwenvl.layers.attention import causal_attention
from qwenvl.layers.norm import RMSNorm
from qwenvl.layers.rotary import apply_rotary
from qwenvl.models.qwen2_vl.config import TextConfig

if TYPE_CHECKING:
    from qwenvl.models.interface import WeightFormat


class PagedAttention(Protocol):
    """The engine's attention over its paged KV cache for one step (``engine/attention.py``)."""

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``q [T, H*D]``, ``k, v [T, Hkv*D]`` before rotary, ``cos, sin [T, D]`` -> ``[T, H*D]``:
        rotary, cache write and attention of the step's tokens, laid end to end; ``dtype``
        bfloat16 lets a prefill's products run in bf16 where the kernel for it applies."""
        ...


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, fmt: WeightFormat | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        q, kv, hidden = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            cfg.hidden_size,
        )
        self.widths = [q, kv, kv]
        self.attention_dtype = torch.float32  # layers.attention.set_attention_dtype
        if fmt is not None:  # one weight read for q, k and v
            parts = {"q_proj": q, "k_proj": kv, "v_proj": kv}
            self.qkv_proj = fmt.linear(hidden, q + 2 * kv, bias=True, parts=parts)
            self.o_proj = fmt.linear(q, hidden, bias=False)
        else:
            self.q_proj = nn.Linear(hidden, q, bias=True)
            self.k_proj = nn.Linear(hidden, kv, bias=True)
            self.v_proj = nn.Linear(hidden, kv, bias=True)
            self.o_proj = nn.Linear(q, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv: PagedAttention | None,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        if "qkv_proj" in self._modules:
            q, k, v = self.qkv_proj(x).split(self.widths, -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if kv is not None:  # paged: the step's tokens are one flat row of sequences
            out = kv.attend(
                self.layer_idx, q[0], k[0], v[0], cos[0, 0], sin[0, 0], self.attention_dtype
            )
            return self.o_proj(out.view(b, n, -1))
        q = q.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # [B, heads, L, hd]
        out = causal_attention(q, k, v, mask)  # [B, heads, L, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig, fmt: WeightFormat | None = None) -> None:
        super().__init__()
        hidden, inner = cfg.hidden_size, cfg.intermediate_size
        if fmt is not None:  # one weight read for gate and up
            parts = {"gate_proj": inner, "up_proj": inner}
            self.gate_up_proj = fmt.linear(hidden, 2 * inner, bias=False, parts=parts)
            self.down_proj = fmt.linear(inner, hidden, bias=False)
            # under bf16 prefill the gate takes the bf16 GEMM output and hands the down GEMM bf16
            # (PackedLinear.bf16_output; the other formats have no bf16 GEMM and ignore it)
            self.gate_up_proj.bf16_output = True
        else:
            self.gate_proj = nn.Linear(hidden, inner, bias=False)
            self.up_proj = nn.Linear(hidden, inner, bias=False)
            self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "gate_up_proj" in self._modules:
            return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, fmt: WeightFormat | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, fmt)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, fmt)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv: PagedAttention | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig, fmt: WeightFormat | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, fmt) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False  # training: keep only layer inputs for backward

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv: PagedAttention | None = None,
    ) -> torch.Tensor:
        """``inputs_embeds [B, L, H]``, rope tables ``[B, 1, L, hd]`` -> final hidden ``[B, L,
        H]``. With ``kv`` (the engine's paged attention) the batch is ``[1, T, H]``: the step's
        tokens of all sequences laid end to end.
        """
        x = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():  # recompute in backward
                x = checkpoint(layer, x, cos, sin, mask, kv, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv)
        return self.norm(x)
