"""Sibling projections that read the same input (q/k/v, gate/up) stored as one parameter, under HF's names.

`fuse(owner, "qkv_proj", ("q_proj", "k_proj", "v_proj"))` replaces `owner`'s three `Linear`s by one whose
weight is their row-wise concatenation, so a forward runs one matmul. `state_dict()` and
`load_state_dict()` see Hugging Face's separate tensors (`q_proj.weight`, `k_proj.weight` ...) through
state-dict hooks on the owner: checkpoints load as they are, sources and savers see HF names and shapes.
Loading joins the parts once (a view when they already lie back to back in one buffer, as llm_offload's
slots lay them out; a copy otherwise); `state_dict()` hands out views of the fused parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from llm_model_parts.layers.linear import Linear


def fuse(owner: nn.Module, fused_name: str, names: Sequence[str]) -> Linear | None:
    """Replace `owner`'s `Linear` children `names` (HF's names, in the order of their outputs; same input
    width, all with or all without bias) by one `owner.<fused_name>`, and register the hooks that keep
    those names in state dicts. Done at build time (on `meta`, before any weight exists). Returns the new
    module, or None (nothing changed) when `owner` lacks one of them or they cannot be fused."""
    children = [getattr(owner, n, None) for n in names]
    if not all(isinstance(c, nn.Linear) for c in children) or hasattr(owner, fused_name):
        return None
    linears: list[nn.Linear] = children  # type: ignore[assignment]
    with_bias = {c.bias is not None for c in linears}
    if len({c.in_features for c in linears}) != 1 or len(with_bias) != 1:
        return None
    first = linears[0].weight
    linear = Linear(
        linears[0].in_features,
        sum(c.out_features for c in linears),
        bias=with_bias.pop(),
        device=first.device,
        dtype=first.dtype,
    )
    for n in names:
        delattr(owner, n)
    owner.add_module(fused_name, linear)
    groups: dict[str, tuple[str, ...]] = getattr(owner, "_fused_groups", {})
    object.__setattr__(owner, "_fused_groups", {**groups, fused_name: tuple(names)})
    object.__setattr__(owner, f"_{fused_name}_sizes", tuple(c.out_features for c in linears))
    if not getattr(owner, "_fused_hooks", False):
        owner.register_state_dict_post_hook(_split_hook)
        owner.register_load_state_dict_pre_hook(_join_hook)
        object.__setattr__(owner, "_fused_hooks", True)
    return linear


def fused_sizes(owner: nn.Module, fused_name: str) -> tuple[int, ...]:
    """The output widths of the projections `fused_name` stands for."""
    sizes: tuple[int, ...] = getattr(owner, f"_{fused_name}_sizes")
    return sizes


def fused_groups(owner: nn.Module) -> dict[str, tuple[str, ...]]:
    """`{fused_name: HF names}` of the groups `fuse` registered on `owner` (empty for other modules)."""
    return dict(getattr(owner, "_fused_groups", {}))


def _split_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for fused_name, names in fused_groups(module).items():
        sizes = getattr(module, f"_{fused_name}_sizes")
        for leaf in ("weight", "bias"):
            key = f"{prefix}{fused_name}.{leaf}"
            if key not in state_dict:
                continue
            for name, part in zip(names, state_dict.pop(key).split(sizes, dim=0), strict=True):
                state_dict[f"{prefix}{name}.{leaf}"] = part


def _join_hook(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    for fused_name, names in fused_groups(module).items():
        for leaf in ("weight", "bias"):
            keys = [f"{prefix}{name}.{leaf}" for name in names]
            present = [k for k in keys if k in state_dict]
            if not present:
                continue
            if len(present) < len(keys):  # leave them: load_state_dict reports the missing ones by HF name
                continue
            state_dict[f"{prefix}{fused_name}.{leaf}"] = join([state_dict.pop(k) for k in keys])


def join(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(tensors)` along dim 0, without a copy when they already lie back to back in one buffer."""
    first = tensors[0]
    if all(t.is_contiguous() and t.dtype == first.dtype and t.device == first.device for t in tensors):
        ptr, adjacent = first.data_ptr(), True
        storage = first.untyped_storage().data_ptr() if first.device.type != "meta" else None
        for t in tensors:
            same = t.device.type != "meta" and t.untyped_storage().data_ptr() == storage
            if not same or t.data_ptr() != ptr:
                adjacent = False
                break
            ptr += t.numel() * t.element_size()
        if adjacent:
            rows = sum(t.shape[0] for t in tensors)
            return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())
    return torch.cat(list(tensors))
