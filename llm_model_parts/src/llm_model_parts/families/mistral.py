"""Mistral: Llama layers with a sliding window on every layer (when `sliding_window` is set)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from llm_model_parts.config import ModelConfig, explicit_or
from llm_model_parts.families.llama import LLAMA_DEFAULTS, build_layer
from llm_model_parts.family import Family


def window_on_every_layer(config: Mapping[str, Any]) -> list[str]:
    kind = "sliding_attention" if config.get("sliding_window") else "full_attention"
    return explicit_or(config, [kind] * int(config["num_hidden_layers"]))


@dataclass(frozen=True)
class MistralConfig(ModelConfig, model_type="mistral"):
    hf_defaults: ClassVar[dict[str, Any]] = {
        **LLAMA_DEFAULTS,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "sliding_window": 4096,
    }

    @classmethod
    def hf_layer_types(cls, config: Mapping[str, Any]) -> list[str]:
        return window_on_every_layer(config)


FAMILY = Family(model_type="mistral", config_class=MistralConfig, build_layer=build_layer)
