"""Several Parts run one after another as one model ("b 0-10" -> "10-20" -> "20-30 e")."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from llm_model_parts.cache import KVCache
from llm_model_parts.forward_func import IncrementalForward, new_cache
from llm_model_parts.part import Part


class Chain(nn.Module):
    """Parts in order; each may sit on its own device (hidden states move between them). One `KVCache`
    (from `new_cache`) serves all of them."""

    def __init__(self, parts: Sequence[Part]) -> None:
        super().__init__()
        _check_order(parts)
        self.parts = nn.ModuleList(parts)
        self.cache: KVCache | None = None  # only for the deprecated `setup_cache`

    def _parts(self) -> list[Part]:
        return [p for p in self.parts if isinstance(p, Part)]

    def new_cache(self, batch_size: int, max_seq_len: int, *, rows: int | None = None) -> KVCache:
        """A cache for the layers of every part, each layer's buffers on its part's device."""
        return new_cache(self._parts(), batch_size, max_seq_len, rows=rows)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, *, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        cache = cache if cache is not None else self.cache
        slots = cache.begin(x.shape[1], attention_mask) if cache is not None else None
        for part in self._parts():
            mask = attention_mask.to(part.device) if attention_mask is not None and cache is None else None
            x = part(x.to(part.device), cache, attention_mask=mask, slots=slots)
        if cache is not None and slots is not None:
            cache.commit(slots)
        return x

    def forward_packed(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        tree_mask: torch.Tensor,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        cache = cache if cache is not None else self.cache
        for part in self._parts():
            x = part.forward_packed(x.to(part.device), position_ids, tree_mask, cache)
        return x

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """Deprecated: keep a cache on the chain, used by calls that pass none. Use `new_cache`."""
        warnings.warn(
            "Chain.setup_cache is deprecated; use cache = chain.new_cache(...) and chain(x, cache)",
            DeprecationWarning,
            stacklevel=2,
        )
        self.cache = self.new_cache(batch_size, max_seq_len)

    def reset_cache(self) -> None:
        if self.cache is not None:
            self.cache.reset()

    def rewind(self, n: int) -> None:
        if self.cache is None:
            raise RuntimeError("rewind: this chain has no cache; pass a KVCache to each call instead")
        self.cache.rewind(n)

    @property
    def seq_len(self) -> int:
        return self.cache.seq_len if self.cache is not None else 0

    def as_forward_func(self, max_seq_len: int | None = None) -> IncrementalForward:
        return IncrementalForward(self._parts(), max_seq_len=max_seq_len)


def chain(parts: Sequence[Part]) -> Chain:
    """Chain parts that together cover a model in order: begin first, layers contiguous, end last."""
    return Chain(parts)


def _check_order(parts: Sequence[Part]) -> None:
    if not parts:
        raise ValueError("chain: no parts")
    specs = [str(p.spec) for p in parts]
    model_types = {p.config.model_type for p in parts}
    if len(model_types) != 1:
        raise ValueError(f"chain: parts of different architectures {sorted(model_types)}")
    layers = [i for p in parts for i in p.layer_indices]
    if layers != list(range(layers[0], layers[0] + len(layers))) if layers else False:
        raise ValueError(
            f"chain: the parts' layers must follow each other without gaps or repeats; got {specs}"
        )
    if any(p.spec.begin for p in parts[1:]) or any(p.spec.end for p in parts[:-1]):
        raise ValueError(f"chain: only the first part may hold begin and only the last end; got {specs}")
