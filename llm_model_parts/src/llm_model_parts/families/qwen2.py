"""Qwen2 / Qwen2.5: Llama layers with q/k/v biases (none on o_proj); optional sliding window on the
layers from `max_window_layers` on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from llm_model_parts.config import ModelConfig, explicit_or
from llm_model_parts.families import Family
from llm_model_parts.families.llama import build_layer as llama_layer


def layer_types(config: Mapping[str, Any]) -> list[str]:
    sliding = config.get("sliding_window") if config.get("use_sliding_window") else None
    first = int(config.get("max_window_layers") or 0)
    n = int(config["num_hidden_layers"])
    default = [
        "sliding_attention" if sliding is not None and i >= first else "full_attention" for i in range(n)
    ]
    return explicit_or(config, default)


def build_layer(config: ModelConfig, i: int) -> nn.Module:
    return llama_layer(config, i, qkv_bias=True)


FAMILY = Family(
    model_type="qwen2",
    build_layer=build_layer,
    defaults={
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "max_window_layers": 28,
        "max_position_embeddings": 32768,
        "attention_bias": False,  # o_proj has no bias; q/k/v always have one
    },
    layer_types=layer_types,
)
