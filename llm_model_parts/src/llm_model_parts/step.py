"""What the layers of a Part need for one forward call, built once per call: cache slots, RoPE tables,
and for each attention window the keys to look at and the mask (or none, when causality alone says it)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionView:
    """Keys `[key_start, Step.end)` of the cache; `mask` (B|1, 1, T, L) bool, True = attend."""

    key_start: int
    mask: torch.Tensor | None
    is_causal: bool


@dataclass
class Step:
    start: int  # first cache slot this call writes
    end: int  # one past the last slot it writes
    rows: int | None  # batch rows written (None: all; packed calls write row 0 only)
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    views: dict[int | None, AttentionView] = field(default_factory=dict)
    # (B, end) bool, True = slot holds a real token (None: no padding); layers that need key positions
    # (ALiBi, chunked attention) derive them from it. `extras` memoises such per-call tensors across layers.
    valid: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def causal_views(
    windows: Iterable[int | None],
    start: int,
    end: int,
    valid: torch.Tensor | None,
    device: torch.device,
) -> dict[int | None, AttentionView]:
    """Views for ordinary calls: queries in slots [start, end) see earlier slots that hold real tokens
    (`valid` (B, end) or None for no padding) within `window` slots of themselves."""
    views: dict[int | None, AttentionView] = {}
    length = end - start
    for window in set(windows):
        key_start = max(0, start - window + 1) if window is not None else 0
        if valid is None and length == 1:
            views[window] = AttentionView(key_start, None, False)
        elif valid is None and start == 0 and (window is None or length <= window):
            views[window] = AttentionView(0, None, True)
        else:
            q = torch.arange(start, end, device=device)[:, None]
            k = torch.arange(key_start, end, device=device)[None, :]
            allowed = k <= q
            if window is not None:
                allowed = allowed & (q - k < window)
            if valid is not None:
                allowed = allowed[None] & valid[:, None, key_start:end]
                # a padded query with no real key before it would get NaN from softmax: let it see itself
                allowed = allowed | (k == q)
            else:
                allowed = allowed[None]
            views[window] = AttentionView(key_start, allowed[:, None], False)
    return views


def packed_views(
    windows: Iterable[int | None],
    start: int,
    offsets: torch.Tensor,
    cache_valid: torch.Tensor | None,
    tree_mask: torch.Tensor,
) -> dict[int | None, AttentionView]:
    """Views for packed prefix-tree calls: packed token j (at `offsets[j]` inside its continuation) sees
    the cached slots [0, start) of row 0 and the packed tokens `tree_mask[0, j]` allows."""
    device = tree_mask.device
    n = tree_mask.shape[-1]
    tree = tree_mask[0].bool() | torch.eye(n, dtype=torch.bool, device=device)
    views: dict[int | None, AttentionView] = {}
    for window in set(windows):
        cached = (
            cache_valid[None, :start].expand(n, start).clone()
            if cache_valid is not None
            else torch.ones(n, start, dtype=torch.bool, device=device)
        )
        packed = tree
        if window is not None:
            q_slot = start + offsets[:, None]
            cached = cached & (q_slot - torch.arange(start, device=device)[None, :] < window)
            packed = packed & (offsets[:, None] - offsets[None, :] < window)
        mask = torch.cat((cached, packed), dim=-1)
        views[window] = AttentionView(0, mask[None, None], False)
    return views
