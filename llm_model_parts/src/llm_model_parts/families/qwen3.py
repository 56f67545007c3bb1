"""Qwen3: Llama layers with per-head RMSNorm on queries and keys (`q_norm`, `k_norm`)."""

from __future__ import annotations

from torch import nn

from llm_model_parts.config import ModelConfig
from llm_model_parts.families import Family
from llm_model_parts.families.llama import build_layer as llama_layer
from llm_model_parts.families.qwen2 import layer_types


def build_layer(config: ModelConfig, i: int) -> nn.Module:
    return llama_layer(config, i, qk_norm=True)


FAMILY = Family(
    model_type="qwen3",
    build_layer=build_layer,
    defaults={
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "head_dim": 128,
        "use_sliding_window": False,
        "max_window_layers": 28,
        "max_position_embeddings": 32768,
    },
    layer_types=layer_types,
)
