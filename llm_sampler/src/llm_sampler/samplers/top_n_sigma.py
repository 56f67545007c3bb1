"""Top-nσ (Tang et al. 2024, llama.cpp's `top_n_sigma`): keep logits within n standard deviations of the max."""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


class TopNSigma:
    """Keep the tokens whose logit is at least `max - n * std`, the std over the row's finite logits."""

    def __init__(self, n: float) -> None:
        self.n = n

    def threshold(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, 1): the lowest logit kept."""
        top = scores.amax(-1, keepdim=True)
        v = scores.shape[-1]
        total = scores.sum(-1, keepdim=True)
        if scores.device.type == "cpu" and bool(total.isfinite().all()):  # no -inf: the usual case
            var = _variance(scores, total / v)
        else:
            finite = scores.isfinite()
            count = finite.sum(-1, keepdim=True).clamp_(min=1)
            x = scores.masked_fill(~finite, 0.0)
            mean = x.sum(-1, keepdim=True) / count
            var = ((x - mean) ** 2).masked_fill(~finite, 0.0).sum(-1, keepdim=True) / count
        return top - self.n * var.clamp_(min=0).sqrt()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(scores < self.threshold(scores), NEG_INF)


def _variance(scores: torch.Tensor, mean: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """(B, 1) population variance of finite rows on the CPU: two passes (centred, so as exact as torch.std)
    over column chunks with the vectorised sum and vector_norm kernels. torch.std is 10x slower there, and a
    whole-row temporary costs more in page faults than the arithmetic."""
    sq = torch.zeros_like(mean)
    lin = torch.zeros_like(mean)
    for block in scores.split(chunk, -1):
        d = block - mean
        sq += torch.linalg.vector_norm(d, dim=-1, keepdim=True).square()
        lin += d.sum(-1, keepdim=True)
    v = scores.shape[-1]
    return sq / v - (lin / v).square()
