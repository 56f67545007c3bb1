"""The incremental forward_func of docs/forward_func.md over one Part or a chain of Parts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from llm_model_parts.cache import CacheOverflowError

if TYPE_CHECKING:
    from llm_model_parts.part import Part

_MIN_CAPACITY = 256


class IncrementalForward:
    """`f(new_ids, attention_mask=None) -> logits`, with `reset()`, `rewind(n)`, `seq_len` and
    `forward_packed(input_ids, position_ids, tree_mask)`.

    The parts' KV caches are allocated at the first call (its batch size fixes B until `reset()`), and
    grow by doubling up to `max_seq_len` (default: the model's `max_position_embeddings`, times the factor
    for dynamic NTK RoPE, which exists to go past it); past that a call raises `CacheOverflowError`.
    """

    def __init__(self, parts: Sequence[Part], max_seq_len: int | None = None) -> None:
        if not parts:
            raise ValueError("IncrementalForward needs at least one part")
        if not parts[0].spec.begin or not parts[-1].spec.end:
            raise ValueError(
                "a forward_func maps token ids to logits: the first part must hold begin ('b') and the last "
                f"end ('e'); got {[str(p.spec) for p in parts]}"
            )
        self.parts = list(parts)
        self.max_seq_len = int(max_seq_len or _default_max_seq_len(parts[0]))
        self._batch_size: int | None = None

    @property
    def seq_len(self) -> int:
        return self.parts[0].seq_len if self._batch_size is not None else 0

    def reset(self) -> None:
        """Forget everything; the next call starts a new sequence (and may use a new batch size)."""
        for part in self.parts:
            part.reset_cache()
        self._batch_size = None

    def rewind(self, n: int) -> None:
        """Drop the last `n` tokens of every row from the caches."""
        if n < 0 or n > self.seq_len:
            raise ValueError(f"rewind({n}): the cache holds {self.seq_len} tokens")
        for part in self.parts:
            part.rewind(n)

    def _ensure_room(self, batch_size: int, new_tokens: int) -> None:
        if self._batch_size is not None and batch_size != self._batch_size:
            raise ValueError(
                f"batch size {batch_size} differs from the {self._batch_size} fixed by the first call; call reset() first"
            )
        needed = self.seq_len + new_tokens
        if needed > self.max_seq_len:
            raise CacheOverflowError(
                f"KV cache overflow: {self.seq_len} cached + {new_tokens} new tokens > max_seq_len={self.max_seq_len}"
            )
        for part in self.parts:
            if self._batch_size is None:  # a new sequence: tokens an earlier forward_func left go
                part.reset_cache()
            cache = part.cache
            if cache is not None and cache.batch_size == batch_size and cache.max_seq_len >= needed:
                continue
            capacity = min(self.max_seq_len, max(_MIN_CAPACITY, 1 << (needed - 1).bit_length()))
            if cache is not None and cache.batch_size == batch_size and self._batch_size is not None:
                part.cache = cache.grown(capacity)
            else:
                part.setup_cache(batch_size, capacity)
        self._batch_size = batch_size

    def __call__(self, new_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if new_ids.dim() != 2:
            raise ValueError(f"new_ids must be a LongTensor (B, T), got shape {tuple(new_ids.shape)}")
        with torch.no_grad():
            self._ensure_room(new_ids.shape[0], new_ids.shape[1])
        with torch.inference_mode():
            x = new_ids
            for part in self.parts:
                mask = attention_mask.to(part.device) if attention_mask is not None else None
                x = part(x.to(part.device), attention_mask=mask)
            return x

    def forward_packed(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor
    ) -> torch.Tensor:
        """Score several continuations of the cached prefix (row 0) at once; the cache is left as it was."""
        with torch.no_grad():
            self._ensure_room(self._batch_size or 1, input_ids.shape[1])
        with torch.inference_mode():
            x = input_ids
            for part in self.parts:
                x = part.forward_packed(x.to(part.device), position_ids, tree_mask)
            return x


def _default_max_seq_len(part: Part) -> int:
    config = part.config
    factor = max(
        (float(r.factor or 1.0) for r in config.rope_parameters.values() if r.rope_type == "dynamic"),
        default=1.0,
    )
    return int(config.max_position_embeddings * factor)
