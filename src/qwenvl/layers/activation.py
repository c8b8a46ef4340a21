"""The gated activation of the decoder MLP, ``silu(gate) * up`` over ``[gate | up]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwenvl import kernels


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` for ``gate_up = [g | u]`` (halves of the last dim); float32 or bf16 CPU
    inference takes the one-call kernel (bf16: the packed gate's output under bf16 prefill)."""
    if kernels.applies(gate_up, dtypes=(torch.float32, torch.bfloat16)):
        return kernels.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
