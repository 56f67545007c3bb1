"""Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): Qwen3's attention (QK-norm, no biases) with sparse MoE layers
(softmax top-k routing, no shared expert)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from llm_model_parts.config import absent_except
from llm_model_parts.config_checks import positive
from llm_model_parts.families.qwen2 import QWEN_DEFAULTS
from llm_model_parts.families.qwen2_moe import QwenMoeConfig, moe_mlp
from llm_model_parts.family import Family
from llm_model_parts.layers.attention import Attention
from llm_model_parts.layers.block import DecoderLayer
from llm_model_parts.layers.norm import RMSNorm


@dataclass(frozen=True)
class Qwen3MoeConfig(QwenMoeConfig, model_type="qwen3_moe"):
    """HF's Qwen3MoeConfig has no `head_dim` default: its model derives hidden_size // num_attention_heads."""

    hf_defaults: ClassVar[dict[str, Any]] = {
        **QWEN_DEFAULTS,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
    }
    hf_aliases: ClassVar[dict[str, str]] = {"num_local_experts": "num_experts"}
    hf_absent: ClassVar[dict[str, Any]] = absent_except("attention_bias")

    moe_intermediate_size: int = positive(768)
    num_experts_per_tok: int = positive(8)
    num_experts: int = positive(128)

    @classmethod
    def hf_layer_types(cls, config: Mapping[str, Any]) -> list[str]:
        """Its model slides the window on every layer when `use_sliding_window` (no `layer_types` field)."""
        on = config["use_sliding_window"] and config.get("sliding_window") is not None
        return ["sliding_attention" if on else "full_attention"] * config["num_hidden_layers"]


def build_layer(config: Qwen3MoeConfig, i: int) -> nn.Module:
    h, eps = config.hidden_size, config.rms_norm_eps
    attn = Attention(
        config,
        i,
        qkv_bias=config.attention_bias,
        o_bias=config.attention_bias,
        qk_norm=lambda d: RMSNorm(d, eps=eps),
    )
    return DecoderLayer(attn, moe_mlp(config, i), RMSNorm(h, eps=eps), RMSNorm(h, eps=eps))


FAMILY = Family(model_type="qwen3_moe", config_class=Qwen3MoeConfig, build_layer=build_layer)
