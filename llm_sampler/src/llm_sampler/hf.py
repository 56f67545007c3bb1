"""`IncrementalHF`: an incremental forward_func over a Hugging Face causal LM's `past_key_values`.

Duck-typed: it calls `model(input_ids=..., attention_mask=..., position_ids=..., past_key_values=...,
use_cache=True)` and reads `.logits` and `.past_key_values` (a `DynamicCache` with `crop`, or the legacy
tuple of (key, value) pairs). transformers is never imported.
"""

from __future__ import annotations

from typing import Any

import torch


class IncrementalHF:
    """`f(new_ids, attention_mask=None) -> logits [B, T, V]`, with `reset()`, `rewind(n)`, `reorder(rows)`
    and `seq_len`, as docs/forward_func.md describes. Logits are returned in fp32."""

    def __init__(self, model: Any) -> None:
        if not callable(model):
            raise TypeError(f"IncrementalHF needs a callable HF model, got {type(model).__name__}")
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # (B, seq_len), 1 = real token

    @property
    def seq_len(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def __call__(self, new_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if new_ids.dim() != 2:
            raise ValueError(f"new_ids must be [B, T], got {tuple(new_ids.shape)}")
        batch, t = new_ids.shape
        if self.mask is not None and self.mask.shape[0] != batch:
            raise ValueError(f"batch size changed from {self.mask.shape[0]} to {batch} without reset()")
        if attention_mask is None:
            ones = torch.ones(batch, t, dtype=torch.long, device=new_ids.device)
            mask = ones if self.mask is None else torch.cat([self.mask, ones], 1)
        else:
            mask = attention_mask.to(new_ids.device).long()
            if mask.shape != (batch, self.seq_len + t):
                raise ValueError(
                    f"attention_mask has shape {tuple(mask.shape)}, expected ({batch}, {self.seq_len + t}): "
                    "it covers the cached tokens and the new ones"
                )
        positions = (mask.cumsum(1) - 1).clamp_(min=0)[:, -t:]
        with torch.no_grad():
            out = self.model(
                input_ids=new_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            )
        self.cache = out.past_key_values
        self.mask = mask
        return out.logits.float()

    def rewind(self, n: int) -> None:
        if n < 0 or n > self.seq_len:
            raise ValueError(f"rewind({n}): the cache holds {self.seq_len} tokens")
        if n == 0 or self.mask is None:
            return
        keep = self.seq_len - n
        if hasattr(self.cache, "crop"):
            self.cache.crop(-n)  # negative: drop n tokens (works across transformers versions)
        else:
            self.cache = tuple((k[:, :, :keep], v[:, :, :keep]) for k, v in self.cache)
        self.mask = self.mask[:, :keep]

    def reorder(self, rows: torch.Tensor) -> None:
        """Make row i of the cache a copy of row `rows[i]` (beam search; the batch size may change)."""
        if self.mask is None:
            return
        rows = rows.to(self.mask.device)
        if hasattr(self.cache, "reorder_cache") and rows.numel() == self.mask.shape[0]:
            self.cache.reorder_cache(rows)
        elif hasattr(self.cache, "layers"):
            for layer in self.cache.layers:
                layer.keys = layer.keys.index_select(0, rows)
                layer.values = layer.values.index_select(0, rows)
        else:
            self.cache = tuple((k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cache)
        self.mask = self.mask.index_select(0, rows)
