"""DRY, "Don't Repeat Yourself" (llama.cpp's `dry_*` parameters).

A token that would extend a repeat of the row's last L tokens (an earlier occurrence of those L tokens was
followed by it), L >= `allowed_length`, loses `multiplier * base ** (L - allowed_length)` from its logit. A
repeat never reaches back across a sequence breaker: the row's suffix is cut at its last breaker token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

MAX_EXPONENT = 40.0  # base ** exponent is capped so that huge repeats give a huge, finite penalty


class BreakerTable:
    """Which token ids are sequence breakers: a token whose text contains a breaker string. Token texts come
    from `decode` one id at a time, cached, so only ids seen in the context are ever decoded."""

    def __init__(self, breakers: Sequence[str], decode: Callable[[list[int]], str] | None) -> None:
        self.breakers = list(breakers)
        self.decode = decode
        self.known = torch.zeros(0, dtype=torch.bool)
        self.is_breaker = torch.zeros(0, dtype=torch.bool)

    def __call__(self, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """ids [B, N] -> bool [B, N]."""
        if not self.breakers or self.decode is None:
            return torch.zeros_like(ids, dtype=torch.bool)
        if self.known.numel() < vocab_size:
            self.known = torch.zeros(vocab_size, dtype=torch.bool)
            self.is_breaker = torch.zeros(vocab_size, dtype=torch.bool)
        flat = ids.reshape(-1).cpu()
        new = flat[~self.known[flat]].unique().tolist()
        for t in new:
            text = self.decode([t])
            self.is_breaker[t] = any(b in text for b in self.breakers)
        self.known[new] = True
        return self.is_breaker.to(ids.device)[ids]


class DRY:
    def __init__(
        self,
        multiplier: float,
        base: float = 1.75,
        allowed_length: int = 2,
        penalty_last_n: int = -1,
        breakers: BreakerTable | None = None,
    ) -> None:
        self.multiplier = multiplier
        self.base = base
        self.allowed_length = allowed_length
        self.penalty_last_n = penalty_last_n
        self.breakers = breakers

    def repeat_lengths(self, ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, T] -> (candidate tokens [B, N], the repeat each would extend there [B, N])."""
        b, t = ids.shape
        if self.penalty_last_n >= 0:
            ids = ids[:, max(0, t - self.penalty_last_n) :]
            t = ids.shape[1]
        rev = ids.flip(1)  # rev[:, 0] is the last token
        # the suffix may not contain a breaker: limit[b] = distance from the end to the row's last breaker
        limit = torch.full((b,), t, dtype=torch.long, device=ids.device)
        if self.breakers is not None:
            brk = self.breakers(rev, vocab_size)
            first = torch.where(brk.any(1), brk.float().argmax(1), torch.full_like(limit, t))
            limit = first
        # z[:, i] (i >= 1): how many tokens before position T-i match the row's last tokens (reversed prefix)
        z = torch.zeros((b, t), dtype=torch.long, device=ids.device)
        alive = torch.ones((b, t), dtype=torch.bool, device=ids.device)
        alive[:, 0] = False
        for k in range(t - 1):
            shifted = torch.zeros_like(alive)
            shifted[:, 1 : t - k] = rev[:, 1 + k :] == rev[:, k : k + 1]
            alive &= shifted & (k < limit)[:, None]
            if k % 8 == 7 and not bool(alive.any()):
                break
            z += alive
        # the candidate after a match ending at reversed position i is the token at reversed position i - 1
        return rev[:, :-1], z[:, 1:]

    def penalties(self, ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (candidate token ids [B, N], their penalties [B, N]); a token may appear several times."""
        tokens, lengths = self.repeat_lengths(ids, vocab_size)
        exponent = (lengths - self.allowed_length).float().clamp(max=MAX_EXPONENT)
        penalty = self.multiplier * torch.pow(self.base, exponent)
        return tokens, torch.where(lengths >= self.allowed_length, penalty, torch.zeros_like(penalty))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] < 2:
            return scores
        tokens, penalty = self.penalties(input_ids, scores.shape[-1])
        # the largest penalty per token, in one pass over the few candidates: min(score, score - penalty)
        lowered = scores.gather(1, tokens) - penalty.to(scores.dtype)
        return scores.scatter_reduce(1, tokens, lowered, reduce="amin")
