"""Swapping weights into a module without touching the module: its tensors live in `_parameters` /
`_buffers` of its submodules; we replace those entries (device views in, `meta` placeholders out).

Weights are named as the module's `state_dict()` names them. Usually those are its parameters' names; a
module whose state-dict hooks present its parameters under other names (llm_model_parts keeps q/k/v as one
fused parameter and shows Hugging Face's `q_proj`, `k_proj`, `v_proj`) gets them through
`load_state_dict(assign=True)`, which runs those hooks. The slot lays a group's tensors out back to back in
state-dict order, so joining them takes no copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn


class WeightBinding:
    """One module's managed tensors: their state-dict names and shapes, and where each of the module's own
    tensors lives (owner module, leaf name) with its meta placeholder."""

    def __init__(self, module: nn.Module, managed: Sequence[str]) -> None:
        self.module = module
        state = module.state_dict(keep_vars=True)
        self._shapes = {name: (tuple(state[name].shape), state[name].dtype) for name in managed}
        own = [n for n, _ in module.named_parameters()]
        own += [n for n, _ in module.named_buffers() if n in self._shapes]
        self.direct = set(own) == set(managed)  # names are the module's own: assign them one by one
        self.entries: list[tuple[str, nn.Module, str, bool, torch.Tensor]] = []
        for name in own:
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            is_param = leaf in owner._parameters
            current = owner._parameters[leaf] if is_param else owner._buffers[leaf]
            assert current is not None
            meta = torch.empty(current.shape, dtype=current.dtype, device="meta")
            placeholder = nn.Parameter(meta, requires_grad=False) if is_param else meta
            self.entries.append((name, owner, leaf, is_param, placeholder))

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return dict(self._shapes)

    def assign(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not self.direct:
            self.module.load_state_dict({n: tensors[n] for n in self._shapes}, strict=False, assign=True)
            return
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
    """The state-dict names of the module's parameters, plus the persistent buffers the source also holds
    (a KV cache kept as a buffer stays)."""
    state = module.state_dict(keep_vars=True)
    params = {id(p) for p in module.parameters()}
    names = [n for n, t in state.items() if id(t) in params or _is_view_of_parameter(t, module)]
    if source_keys is not None:
        keys = set(source_keys)
        names += [n for n, _ in module.named_buffers() if n in keys and n in state and n not in names]
    return names


def _is_view_of_parameter(t: torch.Tensor, module: nn.Module) -> bool:
    base = t._base
    return base is not None and any(base is p for p in module.parameters())
