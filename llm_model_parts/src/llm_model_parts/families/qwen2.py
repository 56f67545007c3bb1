"""Qwen2 / Qwen2.5: Llama layers with q/k/v biases (none on o_proj); optional sliding window on the
layers from `max_window_layers` on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from llm_model_parts.config import ModelConfig, explicit_or
from llm_model_parts.config_checks import non_negative
from llm_model_parts.families.llama import build_layer as llama_layer
from llm_model_parts.family import Family

QWEN_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "sliding_window": 4096,
}


def window_from(config: Mapping[str, Any]) -> list[str]:
    """Sliding windows on layers `max_window_layers`.. when `use_sliding_window` (Qwen2, Qwen3, Qwen3-MoE)."""
    sliding = config.get("sliding_window") if config.get("use_sliding_window") else None
    first = int(config["max_window_layers"])
    n = int(config["num_hidden_layers"])
    return explicit_or(
        config,
        ["sliding_attention" if sliding is not None and i >= first else "full_attention" for i in range(n)],
    )


@dataclass(frozen=True)
class Qwen2Config(ModelConfig, model_type="qwen2"):
    hf_defaults: ClassVar[dict[str, Any]] = QWEN_DEFAULTS

    use_sliding_window: bool = False
    max_window_layers: int = non_negative(28)

    @classmethod
    def hf_layer_types(cls, config: Mapping[str, Any]) -> list[str]:
        return window_from(config)


def build_layer(config: ModelConfig, i: int) -> nn.Module:
    return llama_layer(config, i, qkv_bias=True)


FAMILY = Family(model_type="qwen2", config_class=Qwen2Config, build_layer=build_layer)
