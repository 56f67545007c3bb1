"""Counter-based random numbers: the noise for (seed, step, token id) is a hash of the three.

So a row's samples depend on its own seed only, never on the batch it runs in, on the device, or on
whether the sampler looked at the whole vocabulary or at the survivors of top-k. No Python loop over rows.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32, in int64 without overflow: split x into 16-bit halves."""
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 integer hash on values < 2**32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One 32-bit key per row for this step. seeds: LongTensor[B] -> LongTensor[B]."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    key = _mix32(lo ^ _mix32(hi ^ 0x9E3779B9))
    return _mix32(key ^ _mix32(torch.full_like(key, step & _M32) ^ 0x85EBCA6B))


def uniform(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform(0, 1) float64 noise for each (row key, token id). keys [B], token_ids [B, N] -> [B, N]."""
    h = _mix32(_mix32(token_ids ^ keys[:, None]) ^ 0x27D4EB2F)
    return (h.to(torch.float64) + 0.5) / 4294967296.0


def gumbel(keys: torch.Tensor | None, token_ids: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise shaped like `like` (fp32): argmax(logits + noise) samples softmax(logits).

    Seeded rows hash (key, token id); without keys, torch's global generator is used.
    """
    if keys is None:
        # -log(Exp(1)) is Gumbel(0, 1): the exponential race of gpt-fast, in log space, without a host sync
        return -torch.empty_like(like).exponential_().log_()
    if token_ids is None:
        token_ids = torch.arange(like.shape[-1], device=like.device).expand(like.shape)
    u = uniform(keys, token_ids)
    return (-torch.log(-torch.log(u))).to(like.dtype)
