"""RMSNorm, as Llama and Gemma write it (the two differ in where they round and in the weight offset)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in fp32, round to the input dtype, then scale by `weight`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF's formula, op for op. Not F.rms_norm: on the CPU it dispatches twice as many ops, and while
        # decoding each op runs with caches the weights just streamed through (measurably slower).
        h = x if x.dtype == torch.float32 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * (h if x.dtype == torch.float32 else h.to(x.dtype))


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: scale by `1 + weight` in fp32, round once at the end."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)
