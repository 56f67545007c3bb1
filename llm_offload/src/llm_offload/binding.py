"""Swapping weights into a module without touching the module: its tensors live in `_parameters` /
`_buffers` of its submodules; we replace those entries (device views in, `meta` placeholders out)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn


class WeightBinding:
    """One module's managed tensors: where each lives (owner module, leaf name) and its meta placeholder."""

    def __init__(self, module: nn.Module, managed: Sequence[str]) -> None:
        self.module = module
        self.entries: list[tuple[str, nn.Module, str, bool, torch.Tensor]] = []
        for name in managed:
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            is_param = leaf in owner._parameters
            current = owner._parameters[leaf] if is_param else owner._buffers[leaf]
            assert current is not None
            meta = torch.empty(current.shape, dtype=current.dtype, device="meta")
            placeholder = nn.Parameter(meta, requires_grad=False) if is_param else meta
            self.entries.append((name, owner, leaf, is_param, placeholder))

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {name: (tuple(p.shape), p.dtype) for name, _, _, _, p in self.entries}

    def assign(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, owner, leaf, is_param, _ in self.entries:
            t = tensors[name]
            if is_param:
                owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
            else:
                owner._buffers[leaf] = t

    def clear(self) -> None:
        for _, owner, leaf, is_param, placeholder in self.entries:
            if is_param:
                owner._parameters[leaf] = placeholder  # type: ignore[assignment]
            else:
                owner._buffers[leaf] = placeholder


def managed_names(module: nn.Module, source_keys: Iterable[str] | None) -> list[str]:
    """Parameters, plus the persistent buffers the source also holds (a KV cache kept as a buffer stays)."""
    names = [n for n, _ in module.named_parameters()]
    if source_keys is not None:
        keys = set(source_keys)
        state = module.state_dict(keep_vars=True)
        names += [n for n, _ in module.named_buffers() if n in keys and n in state]
    return names
