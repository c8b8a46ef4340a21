"""The Qwen2 decoder with M-RoPE: GQA attention with q/k/v biases, SwiGLU MLP, RMSNorm.

Module and parameter names equal the checkpoint's (``model.layers.{i}.self_attn.q_proj``...), so
state dicts load without renaming and LoRA adapters target the names users know.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qwenvl import kernels
from qwenvl.layers.attention import causal_attention
from qwenvl.layers.norm import RMSNorm
from qwenvl.layers.rotary import apply_rotary
from qwenvl.models.qwen2_vl.config import TextConfig

if TYPE_CHECKING:
    from qwenvl.engine.kv_cache import PagedContext


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.qkv_proj: nn.Module | None = None  # set by layers.packed_linear.pack_linears

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv: PagedContext | None,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        if self.qkv_proj is not None:  # packed for CPU decoding: one weight read for q, k, v
            kv_width = self.num_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split(
                [self.num_heads * self.head_dim, kv_width, kv_width], -1
            )
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if kv is not None and kv.fused_decode(q):  # CPU float32 decode: one kernel call
            out = kv.attend_decode(self.layer_idx, q[0], k[0], v[0], cos[0, 0], sin[0, 0])
            return self.o_proj(out.view(b, n, -1))
        q = q.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # [B, heads, L, hd]
        if kv is not None:  # paged: the step's tokens are one flat row of sequences
            out = kv.attend(
                self.layer_idx, q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)
            )
            return self.o_proj(out.reshape(b, n, -1))
        out = causal_attention(q, k, v, mask)  # [B, heads, L, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

        self.gate_up_proj: nn.Module | None = None  # set by layers.packed_linear.pack_linears

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:  # packed for CPU decoding: one weight read
            gate_up = self.gate_up_proj(x)
            if kernels.applies(gate_up):
                return self.down_proj(kernels.silu_mul(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv: PagedContext | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False  # training: keep only layer inputs for backward

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv: PagedContext | None = None,
    ) -> torch.Tensor:
        """``inputs_embeds [B, L, H]``, rope tables ``[B, 1, L, hd]`` -> final hidden ``[B, L,
        H]``. With ``kv`` (the engine's paged cache) the batch is ``[1, T, H]``: the step's tokens
        of all sequences laid end to end.
        """
        x = inputs_embeds
        if (
            kv is not None
            and self.layers[0].self_attn.qkv_proj is not None
            and x.shape[1] <= kernels.MAX_M
            and kv.fused_decode(x)
        ):
            return self.norm(self.decode_packed(x[0], cos[0, 0], sin[0, 0], kv)[None])
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():  # recompute in backward
                x = checkpoint(layer, x, cos, sin, mask, kv, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv)
        return self.norm(x)

    def decode_packed(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: PagedContext
    ) -> torch.Tensor:
        """The layers of ``forward`` for an all-decode CPU step of <= 16 tokens of a packed model
        (``pack_linears``): ``x [T, H]``, ``cos, sin [T, head_dim]`` -> ``[T, H]`` before the
        final norm, in one kernel call (``kernels.decode_layers``: the same ops as the modules,
        threads forked once for all layers instead of ~250 torch calls, ~7 ms of a 2B-shape
        step on a small CPU)."""
        # read through the modules' dicts: nn.Module.__getattr__ costs ~1.4 us a lookup, and the
        # ~700 of a 28-layer step took 1 ms of each step
        params: list[torch.Tensor | None] = []
        for layer in self.layers:
            mods = layer._modules
            attn, mlp = mods["self_attn"]._modules, mods["mlp"]._modules
            params.append(mods["input_layernorm"]._parameters["weight"])
            params += attn["qkv_proj"].kernel_params()
            params += attn["o_proj"].kernel_params()
            params.append(mods["post_attention_layernorm"]._parameters["weight"])
            params += mlp["gate_up_proj"].kernel_params()
            params += mlp["down_proj"].kernel_params()
        x = x.contiguous().clone()  # updated in place by the kernel
        kv.decode_layers(x, cos, sin, params, self.cfg.num_attention_heads, self.cfg.rms_norm_eps)
        return x
