"""Several Parts run one after another as one model ("b 0-10" -> "10-20" -> "20-30 e")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from llm_model_parts.forward_func import IncrementalForward
from llm_model_parts.part import Part


class Chain(nn.Module):
    """Parts in order; each may sit on its own device (hidden states move between them)."""

    def __init__(self, parts: Sequence[Part]) -> None:
        super().__init__()
        _check_order(parts)
        self.parts = nn.ModuleList(parts)

    def _parts(self) -> list[Part]:
        return [p for p in self.parts if isinstance(p, Part)]

    def forward(self, x: torch.Tensor, *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        for part in self._parts():
            mask = attention_mask.to(part.device) if attention_mask is not None else None
            x = part(x.to(part.device), attention_mask=mask)
        return x

    def forward_packed(
        self, x: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor
    ) -> torch.Tensor:
        for part in self._parts():
            x = part.forward_packed(x.to(part.device), position_ids, tree_mask)
        return x

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        for part in self._parts():
            part.setup_cache(batch_size, max_seq_len)

    def reset_cache(self) -> None:
        for part in self._parts():
            part.reset_cache()

    def rewind(self, n: int) -> None:
        for part in self._parts():
            part.rewind(n)

    @property
    def seq_len(self) -> int:
        return self._parts()[0].seq_len

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
