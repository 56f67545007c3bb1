"""Begin and end sections for families whose names or structure differ from Llama's `embed_tokens` /
`norm` / `lm_head`: GPT-2's `wte` + learned `wpe`, Falcon's `word_embeddings` + `ln_f`, OPT's offset
positions and `project_in` / `project_out`, GPT-J's `lm_head` bias.

A `Part` registers the children of these modules under their own names (`wte.weight`, `ln_f.bias` ...), so
checkpoints load with HF's names; the modules only say how the children are wired.
"""

from __future__ import annotations

import torch
from torch import nn

from llm_model_parts.layers.linear import Linear


class Begin(nn.Module):
    """Token embedding (`embed_name`), optional learned positions (`positions_name`, looked up at
    `position + position_offset`) and optional `project_in` (applied to token embeddings before positions)."""

    def __init__(
        self,
        vocab_size: int,
        width: int,
        *,
        embed_name: str = "embed_tokens",
        positions_name: str | None = None,
        num_positions: int = 0,
        position_offset: int = 0,
        project_in: int | None = None,
    ) -> None:
        super().__init__()
        self.embed_name, self.positions_name = embed_name, positions_name
        self.position_offset = position_offset
        self.add_module(embed_name, nn.Embedding(vocab_size, width))
        if positions_name is not None:
            hidden = project_in or width
            self.add_module(positions_name, nn.Embedding(num_positions + position_offset, hidden))
        self.project_in = Linear(width, project_in, bias=False) if project_in else None

    @property
    def input_embeddings(self) -> nn.Embedding:
        module = getattr(self, self.embed_name)
        assert isinstance(module, nn.Embedding)
        return module

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """What HF calls `inputs_embeds`: the token embeddings, before any projection or positions."""
        return self.input_embeddings(ids)

    def finish(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`inputs_embeds` (B, T, width), positions (B|1, T) -> the first layer's input."""
        h = self.project_in(embeds) if self.project_in is not None else embeds
        if self.positions_name is not None:
            table = getattr(self, self.positions_name)
            h = h + table(positions.clamp(min=0) + self.position_offset).to(h.dtype)
        return h


class End(nn.Module):
    """Final norm (`norm_name`, may be absent), optional `project_out`, then `lm_head` (optionally biased)."""

    def __init__(
        self,
        norm: nn.Module | None,
        hidden: int,
        vocab_size: int,
        *,
        norm_name: str = "norm",
        project_out: int | None = None,
        head_bias: bool = False,
    ) -> None:
        super().__init__()
        self.norm_name = norm_name
        if norm is not None:
            self.add_module(norm_name, norm)
        self.project_out = Linear(hidden, project_out, bias=False) if project_out else None
        self.lm_head = Linear(project_out or hidden, vocab_size, bias=head_bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        norm = getattr(self, self.norm_name, None)
        if norm is not None:
            h = norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return self.lm_head(h)


def merge_positions(
    ids: torch.Tensor, inputs_embeds: torch.Tensor | tuple[torch.Tensor, torch.Tensor], config: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where extra embeddings (a vision tower's output) go: -> (embeds (N, width), mask (B, T) bool).

    `inputs_embeds` is an `(embeds, mask)` pair, or embeds alone, placed where `ids` equals the config's
    `image_token_id` (or `image_token_index`). Their count must equal the number of marked positions.
    """
    if isinstance(inputs_embeds, tuple):
        embeds, mask = inputs_embeds
        mask = mask.to(device=ids.device, dtype=torch.bool)
        if mask.shape != ids.shape:
            raise ValueError(
                f"inputs_embeds mask must have the ids' shape {tuple(ids.shape)}, got {tuple(mask.shape)}"
            )
    else:
        token = getattr(config, "image_token_id", None)
        if token is None:
            raise ValueError(
                "inputs_embeds without a mask needs the config's image_token_id (or image_token_index); "
                "pass an (embeds, mask) pair instead"
            )
        embeds, mask = inputs_embeds, ids == int(token)
    embeds = embeds.reshape(-1, embeds.shape[-1])
    if int(mask.sum()) != embeds.shape[0]:
        raise ValueError(
            f"inputs_embeds: {embeds.shape[0]} embeddings for {int(mask.sum())} marked positions; they must be equal"
        )
    return embeds, mask
