"""Exclude Top Choices (llama.cpp's `xtc_probability`, `xtc_threshold`)."""

from __future__ import annotations

import torch

from llm_sampler import rng

NEG_INF = float("-inf")
COIN_TOKEN = 0x7FFFFFFF  # the token id whose seeded noise is the row's XTC coin (not a real vocabulary id)


class XTC:
    """With probability `probability` per row and step, remove every token whose probability is at least
    `threshold`, except the least likely of them (nothing happens when fewer than two pass).

    `keys` (set by the selector for seeded rows, one 32-bit key per row) makes the coin reproducible."""

    def __init__(self, probability: float, threshold: float) -> None:
        self.probability = probability
        self.threshold = threshold
        self.keys: torch.Tensor | None = None

    def coin(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the rows where XTC acts this step."""
        if self.keys is None:
            u = torch.rand(scores.shape[0], device=scores.device, dtype=torch.float64)
        else:
            ids = torch.full((scores.shape[0], 1), COIN_TOKEN, device=scores.device, dtype=torch.long)
            u = rng.uniform(self.keys, ids)[:, 0]
        return u < self.probability

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(-1)
        above = probs >= self.threshold  # (B, N)
        # the least likely of those above the threshold survives
        least = probs.masked_fill(~above, 2.0).argmin(-1, keepdim=True)
        remove = above.scatter(1, least, False)
        act = self.coin(scores) & (above.sum(-1) >= 2)
        return scores.masked_fill(remove & act[:, None], NEG_INF)
