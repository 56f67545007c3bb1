"""Top-H (Potraghloo et al., NeurIPS 2025) exactly as transformers' `TopHLogitsWarper`."""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
TOP_N = 100  # transformers' cap on the tokens considered


class TopH:
    """Keep the most likely tokens, in order, while their cumulative entropy terms stay <= top_h * H(top 100)."""

    def __init__(self, top_h: float) -> None:
        self.top_h = top_h

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        top_logits, top_idx = torch.topk(scores, min(TOP_N, scores.shape[-1]), dim=-1)
        # the same float operations as transformers (torch.distributions.Categorical), so ties break alike
        logp = top_logits - top_logits.logsumexp(-1, keepdim=True)
        probs = logp.softmax(-1)
        entropy = -(logp.clamp(min=torch.finfo(logp.dtype).min) * probs).sum(-1, keepdim=True)
        terms = -probs * torch.log(probs)
        keep_sorted = terms.cumsum(-1) <= entropy * self.top_h
        keep_sorted[:, 0] = True
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top_idx, keep_sorted)
        return scores.masked_fill(~keep, NEG_INF)
