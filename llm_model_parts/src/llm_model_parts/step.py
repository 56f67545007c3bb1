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
    start: int | None  # first cache slot this call writes, when every row starts there
    end: int  # one past the last slot any row writes
    rows: slice | None  # cache rows this call covers (None: all of a cache's rows)
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    views: dict[int | None, AttentionView] = field(default_factory=dict)
    # (R, end) bool, True = slot holds a real token (None: no padding); layers that need key positions
    # (ALiBi, chunked attention) derive them from it. `extras` memoises such per-call tensors across layers.
    valid: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    starts: torch.Tensor | None = None  # (R,) first slot per row, when rows start at different slots
    packed: bool = False  # a packed prefix-tree call (forward_packed): positions are not slots

    def slots(self, t: int, device: torch.device) -> torch.Tensor:
        """(R|1, T): the cache slot of each new token."""
        offsets = torch.arange(t, device=device)
        if self.starts is None:
            assert self.start is not None
            return (offsets + self.start)[None]
        return self.starts.to(device)[:, None] + offsets


def causal_views(
    windows: Iterable[int | None],
    start: int | None,
    end: int,
    valid: torch.Tensor | None,
    device: torch.device,
    starts: torch.Tensor | None = None,
) -> dict[int | None, AttentionView]:
    """Views for ordinary calls: the queries of a row in slots [start, end) (per row from `starts` when
    rows start at different slots) see earlier slots of that row that hold real tokens (`valid` (R, end),
    None for no padding) within `window` slots of themselves."""
    views: dict[int | None, AttentionView] = {}
    first = start if start is not None else int(starts.min()) if starts is not None else 0
    length = end - first
    for window in set(windows):
        key_start = max(0, first - window + 1) if window is not None else 0
        if starts is None and valid is None and length == 1:
            views[window] = AttentionView(key_start, None, False)
        elif starts is None and valid is None and first == 0 and (window is None or length <= window):
            views[window] = AttentionView(0, None, True)
        else:
            if starts is None:
                q = torch.arange(first, end, device=device)[None, :, None]  # (1, T, 1)
            else:  # (R, T, 1): each row's T tokens after its own cached ones
                q = (starts.to(device)[:, None] + torch.arange(end - int(starts.max()), device=device))[
                    ..., None
                ]
            k = torch.arange(key_start, end, device=device)[None, None, :]
            allowed = k <= q
            if window is not None:
                allowed = allowed & (q - k < window)
            if valid is not None:
                allowed = allowed & valid[:, None, key_start:end]
                # a padded query with no real key before it would get NaN from softmax: let it see itself
                allowed = allowed | (k == q)
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


def write_cache(
    step: Step, kv: tuple[torch.Tensor, torch.Tensor] | None, k: torch.Tensor, v: torch.Tensor, key_start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one cache write: store k / v (R, H_kv, T, D) at the call's slots of its rows and return the
    keys and values to attend to, slots [key_start, end). Without a cache: k and v themselves."""
    if kv is None:
        return k, v
    k_cache, v_cache = kv
    if step.rows is not None:
        k_cache, v_cache = k_cache[step.rows], v_cache[step.rows]
    t = k.shape[2]
    if step.starts is None:
        assert step.start is not None
        k_cache.narrow(2, step.start, t).copy_(k)
        if v.shape[-1]:
            v_cache.narrow(2, step.start, t).copy_(v)
    else:
        index = step.slots(t, k.device)[:, None, :, None]  # (R, 1, T, 1)
        k_cache.scatter_(2, index.expand(-1, k.shape[1], -1, k.shape[3]), k)
        if v.shape[-1]:
            v_cache.scatter_(2, index.expand(-1, v.shape[1], -1, v.shape[3]), v)
    length = step.end - key_start
    return k_cache.narrow(2, key_start, length), v_cache.narrow(2, key_start, length)
