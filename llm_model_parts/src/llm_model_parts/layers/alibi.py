"""ALiBi (Falcon's variant): a per-head linear bias on key positions, added to the attention scores."""

from __future__ import annotations

import math

import torch

from llm_model_parts.layers.positions import _allowed, key_positions
from llm_model_parts.step import AttentionView, Step


def alibi_slopes(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(num_heads,) fp32: geometric slopes, with odd powers of the next base for a non-power-of-2 count."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = torch.pow(torch.tensor(base, device=device), torch.arange(1, 1 + closest, device=device))
    if closest != num_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(
            torch.tensor(extra_base, device=device), torch.arange(1, 1 + 2 * remaining, 2, device=device)
        )
        slopes = torch.cat([slopes, extra])
    return slopes.float()


def alibi_mask(
    step: Step, view: AttentionView, t: int, num_heads: int, head_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """Float mask (B|1, H, T, L) for `F.scaled_dot_product_attention`: ALiBi bias / sqrt(head_dim) where the
    view allows attention, -inf elsewhere. Memoised in `step.extras` (every layer shares it)."""
    key = f"alibi_{num_heads}_{head_dim}_{dtype}_{t}_{view.key_start}"
    if key not in step.extras:
        positions = key_positions(step, view.key_start)  # (B|1, L)
        device = positions.device
        # Falcon rounds the slopes and their products to bf16 (`slopes.bfloat16() * positions`); so do we.
        slopes = alibi_slopes(num_heads, device).bfloat16()
        bias = (slopes[None, :, None] * positions[:, None, :]).to(dtype) / math.sqrt(head_dim)
        allowed = _allowed(view, t, positions.shape[-1], device)  # (B|1, 1, T, L)
        step.extras[key] = bias[:, :, None, :].masked_fill(~allowed, float("-inf"))
    return step.extras[key]
