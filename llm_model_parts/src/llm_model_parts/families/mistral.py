"""Mistral: Llama layers with a sliding window on every layer (when `sliding_window` is set)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llm_model_parts.config import explicit_or
from llm_model_parts.families import Family
from llm_model_parts.families.llama import build_layer


def layer_types(config: Mapping[str, Any]) -> list[str]:
    kind = "sliding_attention" if config.get("sliding_window") else "full_attention"
    return explicit_or(config, [kind] * int(config["num_hidden_layers"]))


FAMILY = Family(
    model_type="mistral",
    build_layer=build_layer,
    defaults={
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "sliding_window": 4096,
        "max_position_embeddings": 131072,
    },
    layer_types=layer_types,
)
