"""Qwen3: Llama layers with per-head RMSNorm on queries and keys (`q_norm`, `k_norm`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from llm_model_parts.config import ModelConfig, absent_except
from llm_model_parts.config_checks import non_negative
from llm_model_parts.families.llama import build_layer as llama_layer
from llm_model_parts.families.qwen2 import QWEN_DEFAULTS, window_from
from llm_model_parts.family import Family


@dataclass(frozen=True)
class Qwen3Config(ModelConfig, model_type="qwen3"):
    hf_defaults: ClassVar[dict[str, Any]] = {**QWEN_DEFAULTS, "head_dim": 128}
    hf_absent: ClassVar[dict[str, Any]] = absent_except("attention_bias")

    use_sliding_window: bool = False
    max_window_layers: int = non_negative(28)

    @classmethod
    def hf_layer_types(cls, config: Mapping[str, Any]) -> list[str]:
        return window_from(config)


def build_layer(config: ModelConfig, i: int) -> nn.Module:
    return llama_layer(config, i, qk_norm=True)


FAMILY = Family(model_type="qwen3", config_class=Qwen3Config, build_layer=build_layer)
