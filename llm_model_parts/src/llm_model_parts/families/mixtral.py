"""Mixtral: Mistral's attention (GQA, optional sliding window) with a sparse MoE block (`block_sparse_moe`,
softmax top-k routing renormalised over the chosen experts, experts `w1` / `w3` / `w2`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from llm_model_parts.config import ModelConfig
from llm_model_parts.config_checks import positive
from llm_model_parts.families.llama import LLAMA_DEFAULTS
from llm_model_parts.families.mistral import window_on_every_layer
from llm_model_parts.family import Family
from llm_model_parts.layers.attention import KV, Attention
from llm_model_parts.layers.moe import MixtralSparseMoe
from llm_model_parts.layers.norm import RMSNorm
from llm_model_parts.step import Step


@dataclass(frozen=True)
class MixtralConfig(ModelConfig, model_type="mixtral"):
    hf_defaults: ClassVar[dict[str, Any]] = {
        **LLAMA_DEFAULTS,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,  # MixtralConfig.default_theta
    }
    hf_aliases: ClassVar[dict[str, str]] = {"num_experts": "num_local_experts"}

    num_experts_per_tok: int = positive(2)
    num_local_experts: int = positive(8)

    @classmethod
    def hf_layer_types(cls, config: Mapping[str, Any]) -> list[str]:
        return window_on_every_layer(config)


class MixtralDecoderLayer(nn.Module):
    def __init__(self, config: MixtralConfig, i: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, i)
        self.block_sparse_moe = MixtralSparseMoe(
            h,
            config.intermediate_size,
            config.num_local_experts,
            config.num_experts_per_tok,
            config.hidden_act,
        )
        self.input_layernorm = RMSNorm(h, eps=eps)
        self.post_attention_layernorm = RMSNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, step: Step, kv: KV | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), step, kv)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h))


FAMILY = Family(model_type="mixtral", config_class=MixtralConfig, build_layer=MixtralDecoderLayer)
