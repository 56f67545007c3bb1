"""The pre-norm decoder layer of Llama, Mistral, Qwen2/3 and Phi-3."""

from __future__ import annotations

import torch
from torch import nn

from llm_model_parts.layers.attention import KV
from llm_model_parts.step import Step


class DecoderLayer(nn.Module):
    """`x + attn(norm(x))`, then `+ mlp(norm(.))`, with HF's submodule names."""

    def __init__(
        self,
        self_attn: nn.Module,
        mlp: nn.Module,
        input_layernorm: nn.Module,
        post_attention_layernorm: nn.Module,
    ) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm

    def forward(self, x: torch.Tensor, step: Step, kv: KV | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), step, kv)
        return h + self.mlp(self.post_attention_layernorm(h))
