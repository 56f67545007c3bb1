"""Preallocated, index-addressed KV cache for the layers of one Part: (B, H_kv, S, D) per layer, written
in place at the slots of each call, plus which slots hold real tokens (left padding) per row."""

from __future__ import annotations

import torch


class CacheOverflowError(RuntimeError):
    """A call would write past the cache's `max_seq_len`."""


class KVCache:
    def __init__(
        self,
        shapes: list[tuple[int, ...]],
        batch_size: int,
        max_seq_len: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        """`shapes[i]` is (key/value heads, head_dim) of the part's i-th layer, or (heads, key dim, value dim)
        when values differ from keys (DeepSeek's MLA caches its compressed latent as keys and no values)."""
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError(
                f"setup_cache: batch_size and max_seq_len must be >= 1, got {batch_size}, {max_seq_len}"
            )
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.keys = [
            torch.zeros(batch_size, s[0], max_seq_len, s[1], device=device, dtype=dtype) for s in shapes
        ]
        self.values = [
            torch.zeros(batch_size, s[0], max_seq_len, s[-1], device=device, dtype=dtype) for s in shapes
        ]
        self.valid = torch.ones(batch_size, max_seq_len, dtype=torch.bool, device=device)
        self.seq_len = 0
        self.has_padding = False

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[i], self.values[i]

    def check_room(self, new_tokens: int) -> None:
        if self.seq_len + new_tokens > self.max_seq_len:
            raise CacheOverflowError(
                f"KV cache overflow: {self.seq_len} cached + {new_tokens} new tokens > max_seq_len="
                f"{self.max_seq_len}; call setup_cache with a larger max_seq_len, rewind(n) or reset_cache()"
            )

    def record_mask(self, attention_mask: torch.Tensor | None, new_tokens: int) -> None:
        """Mark which of slots [0, seq_len + new_tokens) hold real tokens (before the layers run)."""
        end = self.seq_len + new_tokens
        if attention_mask is None:
            self.valid[:, self.seq_len : end] = True
            return
        self.valid[:, :end] = attention_mask.to(torch.bool)
        self.has_padding = self.has_padding or not bool(attention_mask.all())

    def advance(self, new_tokens: int) -> None:
        self.seq_len += new_tokens

    def rewind(self, n: int) -> None:
        if n < 0 or n > self.seq_len:
            raise ValueError(f"rewind({n}): the cache holds {self.seq_len} tokens")
        self.seq_len -= n

    def reset(self) -> None:
        self.seq_len = 0
        self.has_padding = False

    def grown(self, max_seq_len: int) -> KVCache:
        """A larger cache holding the same contents (for callers that grow on demand)."""
        k0 = self.keys[0] if self.keys else self.valid
        new = KVCache(
            [(k.shape[1], k.shape[3], v.shape[3]) for k, v in zip(self.keys, self.values, strict=True)],
            self.batch_size,
            max_seq_len,
            device=k0.device,
            dtype=self.keys[0].dtype if self.keys else torch.float32,
        )
        n = self.seq_len
        for old, fresh in zip(self.keys + self.values, new.keys + new.values, strict=True):
            fresh[:, :, :n] = old[:, :, :n]
        new.valid[:, :n] = self.valid[:, :n]
        new.seq_len, new.has_padding = n, self.has_padding
        return new

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
