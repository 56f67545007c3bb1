"""What enters a Part: token ids (checked against the vocabulary) with optional extra embeddings placed
where a vision tower's output goes, or hidden states from the part before."""

from __future__ import annotations

from typing import Any

import torch

from llm_model_parts.layers.ends import merge_positions

InputsEmbeds = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def embed_inputs(
    part: Any, x: torch.Tensor | None, inputs_embeds: InputsEmbeds | None = None
) -> torch.Tensor:
    """The first layer's input before positions: token embeddings (scaled as the family scales them),
    with `inputs_embeds` merged in, or `inputs_embeds` (B, T, width) itself."""
    if isinstance(inputs_embeds, torch.Tensor) and inputs_embeds.dim() == 3:
        return inputs_embeds.to(device=part.device, dtype=part.dtype)
    if x is None or x.dim() != 2 or x.is_floating_point() or x.is_complex():
        got = "None" if x is None else f"{x.dtype} of shape {tuple(x.shape)}"
        raise ValueError(
            f"part {str(part.spec)!r} holds the embeddings: expected token ids LongTensor (B, T), got {got}"
        )
    x = x.to(part.device)
    merge = None
    if inputs_embeds is not None:
        merge = merge_positions(x, inputs_embeds, part.config)
        x = x.masked_fill(merge[1], 0)  # image tokens may lie outside the text vocabulary
    vocab = part.config.vocab_size
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab):
        bad = x[(x < 0) | (x >= vocab)][0]
        raise ValueError(f"token id {int(bad)} is out of the vocabulary (vocab_size={vocab})")
    h = part.begin_section.embed(x)
    if part.embed_scale != 1.0:
        h = h * embed_scale(part.embed_scale, h.dtype)
    if merge is not None:
        embeds, where = merge
        h = h.masked_scatter(where[..., None], embeds.to(device=h.device, dtype=h.dtype))
    return h


def embed_scale(scale: float, dtype: torch.dtype) -> float:
    """HF multiplies by the scale rounded to the weights' dtype (sqrt(640) in bf16 is not sqrt(640))."""
    return float(torch.tensor(scale, dtype=torch.float32).to(dtype))


def check_hidden(part: Any, x: torch.Tensor | None) -> torch.Tensor:
    """Hidden states (B, T, hidden) for a part that starts at a decoder layer."""
    width = part.config.hidden_size
    if x is None:
        raise ValueError(f"part {str(part.spec)!r} needs hidden states (B, T, {width}), got None")
    if x.dim() != 3 or x.shape[-1] != width or not x.is_floating_point():
        first = part.layer_indices[0] if part.layer_indices else "end"
        raise ValueError(
            f"part {str(part.spec)!r} starts at layer {first}: "
            f"expected hidden states (B, T, {width}), got {x.dtype} of shape {tuple(x.shape)}"
        )
    return x.to(device=part.device, dtype=part.dtype)
