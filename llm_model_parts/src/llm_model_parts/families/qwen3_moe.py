"""Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): Qwen3's attention (QK-norm, no biases) with sparse MoE layers
(softmax top-k routing, no shared expert)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from llm_model_parts.config import ModelConfig, explicit_or
from llm_model_parts.families import Family
from llm_model_parts.families.qwen2_moe import moe_mlp
from llm_model_parts.layers.attention import Attention
from llm_model_parts.layers.block import DecoderLayer
from llm_model_parts.layers.norm import RMSNorm


def build_layer(config: ModelConfig, i: int) -> nn.Module:
    h, eps = config.hidden_size, config.rms_norm_eps
    attn = Attention(
        config,
        i,
        qkv_bias=config.attention_bias,
        o_bias=config.attention_bias,
        qk_norm=lambda d: RMSNorm(d, eps=eps),
    )
    return DecoderLayer(attn, moe_mlp(config, i, shared=False), RMSNorm(h, eps=eps), RMSNorm(h, eps=eps))


def layer_types(config: Mapping[str, Any]) -> list[str]:
    n = int(config["num_hidden_layers"])
    first = int(config.get("max_window_layers") or 0)
    on = bool(config.get("use_sliding_window"))
    return explicit_or(
        config, ["sliding_attention" if on and i >= first else "full_attention" for i in range(n)]
    )


FAMILY = Family(
    model_type="qwen3_moe",
    build_layer=build_layer,
    defaults={
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "head_dim": 128,
        "use_sliding_window": False,
        "max_window_layers": 28,
        "max_position_embeddings": 32768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "decoder_sparse_step": 1,
    },
    layer_types=layer_types,
)
