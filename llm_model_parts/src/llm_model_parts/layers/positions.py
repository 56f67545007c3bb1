"""Where the keys of a step sit: their positions over real tokens and the view's mask made explicit, for the
attention variants that add position-dependent biases (ALiBi, Llama 4's chunks and temperature)."""

from __future__ import annotations

import torch

from llm_model_parts.step import AttentionView, Step


def key_positions(step: Step, key_start: int) -> torch.Tensor:
    """Positions (B|1, L) of the keys in slots [key_start, end): counted over real tokens, as HF derives them
    from the attention mask."""
    if step.valid is None:
        return torch.arange(key_start, step.end, device=_device(step))[None]
    return ((step.valid.long().cumsum(-1) - 1) * step.valid)[:, key_start : step.end]


def _device(step: Step) -> torch.device:
    for cos, _ in step.rope.values():
        return cos.device
    for view in step.views.values():
        if view.mask is not None:
            return view.mask.device
    if step.valid is not None:
        return step.valid.device
    return torch.device("cpu")


def _allowed(view: AttentionView, t: int, length: int, device: torch.device) -> torch.Tensor:
    """The view's boolean mask, materialised (B|1, 1, T, L)."""
    if view.mask is not None:
        return view.mask
    if view.is_causal:
        return torch.ones(t, length, dtype=torch.bool, device=device).tril(length - t)[None, None]
    return torch.ones(1, 1, t, length, dtype=torch.bool, device=device)
