"""Mixtral: Mistral's attention (GQA, optional sliding window) with a sparse MoE block (`block_sparse_moe`,
softmax top-k routing renormalised over the chosen experts, experts `w1` / `w3` / `w2`)."""

from __future__ import annotations

import torch
from torch import nn

from llm_model_parts.config import ModelConfig
from llm_model_parts.families import Family
from llm_model_parts.families.mistral import layer_types
from llm_model_parts.layers.attention import KV, Attention
from llm_model_parts.layers.moe import MixtralSparseMoe
from llm_model_parts.layers.norm import RMSNorm
from llm_model_parts.step import Step


class MixtralDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, i: int) -> None:
        super().__init__()
        h, eps, raw = config.hidden_size, config.rms_norm_eps, config.raw
        self.self_attn = Attention(config, i)
        self.block_sparse_moe = MixtralSparseMoe(
            h,
            config.intermediate_size,
            int(raw.get("num_local_experts", 8)),
            int(raw.get("num_experts_per_tok", 2)),
            config.hidden_act,
        )
        self.input_layernorm = RMSNorm(h, eps=eps)
        self.post_attention_layernorm = RMSNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, step: Step, kv: KV | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), step, kv)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h))


FAMILY = Family(
    model_type="mixtral",
    build_layer=MixtralDecoderLayer,
    defaults={
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "sliding_window": None,
        "max_position_embeddings": 131072,
        "rope_theta": 1e6,
    },
    layer_types=layer_types,
)
