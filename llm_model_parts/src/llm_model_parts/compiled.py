"""A decode step compiled with `torch.compile(fullgraph=True)`: one token per row over a static cache.

The eager forward reads only the cache slots in use (`narrow` to the longest row), which changes shape
every step. Here every shape is fixed instead, as gpt-fast does: each row writes its token at its own
slot (a scatter at a tensor of positions) and attends over all `max_seq_len` slots with a mask, so one
graph serves every step and every mix of row lengths; `mode="reduce-overhead"` adds CUDA graphs on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from llm_model_parts.cache import KVCache
from llm_model_parts.inputs import embed_scale
from llm_model_parts.step import AttentionView, Step


class CompiledDecoder:
    """`decoder(ids (R, 1)) -> logits (R, 1, V)` for the rows in use of `cache`, which it commits.

    `part` must hold begin and end. Prefill with the eager `part(prompt, cache)` first; this replaces only
    the per-token calls. `mode` and `dynamic=False` go to `torch.compile`.
    """

    def __init__(self, part: Any, cache: KVCache, *, mode: str | None = None) -> None:
        if not part.spec.begin or not part.spec.end:
            raise ValueError(f"CompiledDecoder needs a part holding begin and end, got {str(part.spec)!r}")
        self.part, self.cache = part, cache
        self._step = torch.compile(self._decode, fullgraph=True, dynamic=False, mode=mode)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if ids.dim() != 2 or ids.shape[1] != 1 or ids.shape[0] != cache.rows:
            raise ValueError(f"CompiledDecoder: expected ids ({cache.rows}, 1), got {tuple(ids.shape)}")
        slots = cache.begin(1)
        with torch.inference_mode():
            logits = self._step(ids.to(self.part.device), slots.starts_t, cache.valid[: cache.rows])
        cache.commit(slots)
        return logits

    def _decode(self, ids: torch.Tensor, starts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        part = self.part
        slots = torch.arange(valid.shape[1], device=valid.device)
        query = starts[:, None, None, None]  # (R, 1, 1, 1): each row's new slot
        keys = slots[None, None, None, :]  # (1, 1, 1, S)
        causal = (keys <= query) & valid[:, None, None, :]
        views = {}
        for window in part._windows:
            mask = causal if window is None else causal & (query - keys < window)
            views[window] = AttentionView(0, mask, False)
        positions = valid.long().cumsum(-1).gather(1, starts[:, None]) - 1  # (R, 1)
        h = part.begin_section.embed(ids)
        if part.embed_scale != 1.0:
            h = h * embed_scale(part.embed_scale, h.dtype)
        h = part.begin_section.finish(h, positions)
        step = Step(None, valid.shape[1], slice(0, ids.shape[0]), views=views, starts=starts)
        step.rope = part._rope(positions, h.dtype)
        out: torch.Tensor = part._output(part._layers(h, step, self.cache))
        return out
