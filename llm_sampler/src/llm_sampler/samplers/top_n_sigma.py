"""Top-nσ (Tang et al. 2024, llama.cpp's `top_n_sigma`): keep logits within n standard deviations of the max."""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


class TopNSigma:
    """Keep the tokens whose logit is at least `max - n * std`, the std over the row's finite logits."""

    def __init__(self, n: float) -> None:
        self.n = n

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        low, top = torch.aminmax(scores, dim=-1, keepdim=True)  # one pass: an -inf shows in the minimum
        if not bool(torch.isinf(low).any() | torch.isinf(top).any()):  # usual: std over the row, fused
            std = torch.std(scores, -1, keepdim=True, correction=0)
            return scores.masked_fill(scores < top - self.n * std, NEG_INF)
        finite = scores.isfinite()
        count = finite.sum(-1, keepdim=True).clamp_(min=1)
        x = scores.masked_fill(~finite, 0.0)
        mean = x.sum(-1, keepdim=True) / count
        var = ((x - mean) ** 2).masked_fill(~finite, 0.0).sum(-1, keepdim=True) / count
        return scores.masked_fill(scores < top - self.n * var.sqrt(), NEG_INF)
