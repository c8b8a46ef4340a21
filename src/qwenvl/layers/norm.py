"""RMSNorm as the reference computes it: statistics in float32, the weight applied in the input
dtype. Float32 inference on the CPU takes the one-call kernel (``qwenvl.kernels.rms_norm``).
"""

from __future__ import annotations

import torch
from torch import nn

from qwenvl import kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.applies(x, self.weight):
            return kernels.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
