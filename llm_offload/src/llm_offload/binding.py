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
            self._check_loaded()
            return
        for name, owner, leaf, is_param, _ in self.entries:
            t = tensors[name]
            if is_param:
                owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
            else:
                owner._buffers[leaf] = t

    def _check_loaded(self) -> None:
        # A parameter the state-dict hooks did not fill would run on its `meta` placeholder: some CPU
        # kernels read no data from it and return garbage instead of raising.
        for name, owner, leaf, is_param, placeholder in self.entries:
            if (owner._parameters if is_param else owner._buffers)[leaf] is placeholder:
                raise RuntimeError(
                    f"{type(self.module).__name__}: its weight {name!r} was not loaded from the names "
                    f"its state_dict() gives ({', '.join(self._shapes)})"
                )

    def clear(self) -> None:
        for _, owner, leaf, is_param, placeholder in self.entries:
            if is_param:
                owner._parameters[leaf] = placeholder  # type: ignore[assignment]
            else:
                owner._buffers[leaf] = placeholder


def managed_names(module: nn.Module, source_keys: Iterable[str] | None) -> list[str]:
    """The state-dict names of the module's parameters, plus the persistent buffers the source also holds
    (a KV cache kept as a buffer stays).

    Every tensor in the state dict that is not a buffer stands for parameters, under the names the module's
    state-dict hooks give them (llm_model_parts shows a fused q/k/v as HF's `q_proj`, `k_proj`, `v_proj`).
    Telling them apart by identity or by `._base` would miss views that autograd does not track (weights
    loaded under `torch.inference_mode`)."""
    state = module.state_dict(keep_vars=True)
    buffers = {n for n, _ in module.named_buffers()}
    names = [n for n, t in state.items() if isinstance(t, torch.Tensor) and n not in buffers]
    if source_keys is not None:
        keys = set(source_keys)
        names += [n for n in state if n in buffers and n in keys]
    return names
