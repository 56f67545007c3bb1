"""Mirostat v1 and v2 (Basu et al. 2021), as llama.cpp implements them (`mirostat`, `mirostat_tau`,
`mirostat_eta`): a target surprise `tau`, a per-row state `mu` (starts at 2 * tau, one per sequence)."""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")
V1_M = 100  # llama.cpp's number of tokens used to estimate the Zipf exponent


class Mirostat:
    """`truncate(scores)` filters the row's distribution for this step; `update(scores, tokens)` moves `mu`
    by the observed surprise of the chosen tokens under the truncated, renormalised distribution."""

    def __init__(self, version: int, tau: float = 5.0, eta: float = 0.1) -> None:
        self.version = version
        self.tau = tau
        self.eta = eta
        self.mu: torch.Tensor | None = None

    def _mu(self, scores: torch.Tensor) -> torch.Tensor:
        if self.mu is None or self.mu.shape[0] != scores.shape[0]:
            self.mu = torch.full((scores.shape[0], 1), 2 * self.tau, device=scores.device)
        return self.mu

    def truncate(self, scores: torch.Tensor) -> torch.Tensor:
        mu = self._mu(scores)
        if self.version == 2:
            surprise = -scores.log_softmax(-1) / math.log(2)
            remove = (surprise > mu) & (scores < scores.amax(-1, keepdim=True))
            return scores.masked_fill(remove, NEG_INF)
        return self._truncate_v1(scores, mu)

    def _truncate_v1(self, scores: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        n = scores.shape[-1]
        sorted_scores = scores.sort(-1, descending=True).values
        probs = sorted_scores.softmax(-1)
        m = min(V1_M, n) - 1
        i = torch.arange(m, device=scores.device, dtype=scores.dtype)
        t = torch.log((i + 2) / (i + 1))
        b = torch.log(probs[:, :m] / probs[:, 1 : m + 1]).nan_to_num(0.0, posinf=0.0, neginf=0.0)
        s_hat = (t * b).sum(-1, keepdim=True) / (t * t).sum()
        eps_hat = s_hat - 1
        k = ((eps_hat * torch.exp2(mu)) / (1 - n ** (-eps_hat))).pow(1 / s_hat)
        k = k.nan_to_num(float(n)).clamp(1, n).long()  # (B, 1)
        kth = sorted_scores.gather(1, k - 1)
        return scores.masked_fill(scores < kth, NEG_INF)

    def update(self, truncated: torch.Tensor, tokens: torch.Tensor) -> None:
        """truncated [B, V] (the output of `truncate`), tokens [B] chosen from it."""
        mu = self._mu(truncated)
        logp = truncated.log_softmax(-1).gather(1, tokens[:, None])
        observed = -logp / math.log(2)
        self.mu = mu - self.eta * (observed - self.tau)
