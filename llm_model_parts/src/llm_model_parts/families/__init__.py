"""The built-in model families, one small file each, composing the shared layers. Importing this package
registers them (their config classes register themselves as their modules load); `get_family` looks one up."""

from __future__ import annotations

from typing import Any

from llm_model_parts.families import (
    deepseek_v3,
    falcon,
    gemma3,
    gpt2,
    gptj,
    llama,
    llama4,
    mistral,
    mixtral,
    opt,
    phi3,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
)
from llm_model_parts.family import Family, lookup, register, registered

__all__ = ["Family", "get_family", "register", "supported_architectures"]

for _module in (
    llama,
    mistral,
    qwen2,
    qwen3,
    phi3,
    gemma3,
    falcon,
    gpt2,
    gptj,
    opt,
    mixtral,
    qwen2_moe,
    qwen3_moe,
    deepseek_v3,
    llama4,
):
    register(_module.FAMILY)


def supported_architectures() -> list[str]:
    """The `model_type`s this package can build, sorted."""
    return registered()


def get_family(model_type: object) -> Family[Any]:
    return lookup(model_type)
