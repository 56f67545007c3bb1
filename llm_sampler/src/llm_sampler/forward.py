"""Talking to a forward_func (docs/forward_func.md): stateless or incremental, checked outputs."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

ForwardFunc = Callable[..., torch.Tensor]


def is_incremental(f: Any) -> bool:
    return callable(f) and hasattr(f, "reset") and hasattr(f, "rewind")


def accepts_attention_mask(f: Any) -> bool:
    try:
        params = inspect.signature(f).parameters
    except (TypeError, ValueError):
        return False
    return "attention_mask" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def as_batch(
    input_ids: Any, attention_mask: Any = None, pad_token_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts -> (LongTensor[B, T], left-padding mask or None). Accepts a tensor [T] or [B, T], a list of
    ints, or a list of lists of ints (ragged lists are left-padded)."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids
    elif isinstance(input_ids, Sequence) and len(input_ids) and isinstance(input_ids[0], Sequence):
        lengths = [len(r) for r in input_ids]
        if min(lengths) == 0:
            raise ValueError(
                f"input_ids row {lengths.index(0)} is empty: every prompt needs at least one token (e.g. BOS)"
            )
        width = max(lengths)
        ids = torch.tensor([[pad_token_id] * (width - len(r)) + list(r) for r in input_ids], dtype=torch.long)
        if attention_mask is None and min(lengths) != width:
            attention_mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], dtype=torch.long)
    else:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int, torch.int32, torch.int16):
        raise ValueError(
            f"input_ids must be integer token ids of shape [B, T], got {tuple(ids.shape)} {ids.dtype}"
        )
    ids = ids.long()
    if ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ValueError(
            f"input_ids has shape {tuple(ids.shape)}: give at least one prompt of at least one token (e.g. BOS)"
        )
    if (ids < 0).any():
        raise ValueError("input_ids holds negative token ids")
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask).to(ids.device).long()
        if mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}: they must match"
            )
        if (mask.sum(1) == 0).any():
            raise ValueError("attention_mask has a row without any real token")
        if bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("attention_mask must be left padding (zeros before ones in every row)")
        return ids, (None if bool(mask.all()) else mask)
    return ids, None


def last_logits(logits: Any, batch: int, what: str = "forward_func") -> torch.Tensor:
    """Checked [B, V] logits of the last position from a [B, T, V] or [B, V] output."""
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{what} must return logits [B, T, V] or [B, V], got {shape}")
    if logits.shape[0] != batch:
        raise ValueError(f"{what} returned logits for a batch of {logits.shape[0]}, sent {batch} rows")
    return logits[:, -1] if logits.dim() == 3 else logits


def all_logits(logits: Any, batch: int, length: int, what: str = "forward_func") -> torch.Tensor:
    """Checked [B, T, V] logits for every position sent."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{what} must return logits for every position, [B, T, V], got {shape}")
    if logits.shape[0] != batch or logits.shape[1] != length:
        raise ValueError(
            f"{what} returned logits of shape {tuple(logits.shape)} for input [{batch}, {length}]"
        )
    return logits


class Caller:
    """Sends token ids to a forward_func: the whole sequence (stateless) or only the new tokens (incremental)."""

    def __init__(self, forward_func: ForwardFunc) -> None:
        if not callable(forward_func):
            raise TypeError(f"forward_func must be callable, got {type(forward_func).__name__}")
        self.f = forward_func
        self.incremental = is_incremental(forward_func)
        self.takes_mask = self.incremental or accepts_attention_mask(forward_func)
        self.sent = 0  # tokens of the sequence the incremental function has seen

    def reset(self) -> None:
        self.sent = 0
        if self.incremental:
            self.f.reset()  # type: ignore[attr-defined]

    def rewind(self, n: int) -> None:
        """Forget the last n tokens (incremental: rewinds the cache)."""
        if n <= 0:
            return
        if self.incremental:
            self.f.rewind(n)  # type: ignore[attr-defined]
        self.sent -= n

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """ids: the whole sequence so far [B, T]; returns the logits of the positions not sent before."""
        new = ids[:, self.sent :] if self.incremental else ids
        if new.shape[1] == 0:
            raise ValueError("nothing new to send to the forward_func")
        kwargs = {}
        if mask is not None and self.takes_mask:
            kwargs["attention_mask"] = mask
        out = self.f(new, **kwargs)
        n_new = ids.shape[1] - self.sent
        self.sent = ids.shape[1]
        if isinstance(out, torch.Tensor) and out.dim() == 3 and not self.incremental:
            out = out[:, -n_new:]
        return out
