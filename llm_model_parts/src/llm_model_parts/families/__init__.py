"""Model families: one small file each, composing the shared layers. `get_family` looks one up."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from llm_model_parts.config import ModelConfig, RopeParameters


def _all_full(config: Mapping[str, Any]) -> list[str]:
    from llm_model_parts.config import all_full, explicit_or

    return explicit_or(config, all_full(config))


def _single_rope(config: Mapping[str, Any]) -> dict[str, RopeParameters]:
    from llm_model_parts.config import single_rope_for_all

    return single_rope_for_all(config)


def _rms_norm(config: ModelConfig) -> nn.Module:
    from llm_model_parts.layers.norm import RMSNorm

    return RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


@dataclass(frozen=True)
class Family:
    """How to build one architecture's part models from its config.

    `defaults` are HF's config defaults for fields a `config.json` may leave out; `layer_types` and
    `rope_parameters` read the raw (defaults-merged) config; `build_layer(config, i)` makes decoder layer i
    with HF's submodule names; `build_norm` makes the final norm; `embed_scale` multiplies embeddings.

    Families whose config or begin/end differ from Llama's also set: `normalize` (maps the config's own
    field names, e.g. GPT-2's `n_embd`, to the ones `ModelConfig` reads, before validation); `build_begin`
    / `build_end` (a `layers.ends.Begin` / `End` whose children carry HF's names: `wte`, `wpe`, `ln_f` ...).
    """

    model_type: str
    build_layer: Callable[[ModelConfig, int], nn.Module]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    layer_types: Callable[[Mapping[str, Any]], list[str]] = _all_full
    rope_parameters: Callable[[Mapping[str, Any]], dict[str, RopeParameters]] = _single_rope
    build_norm: Callable[[ModelConfig], nn.Module] = _rms_norm
    embed_scale: Callable[[ModelConfig], float] = lambda config: 1.0
    normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    build_begin: Callable[[ModelConfig], nn.Module] | None = None
    build_end: Callable[[ModelConfig], nn.Module] | None = None


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family (used by the family modules; other packages may add their own)."""
    _REGISTRY[family.model_type] = family
    return family


def _load_builtin() -> None:
    if _REGISTRY:
        return
    from llm_model_parts.families import gemma3, llama, mistral, phi3, qwen2, qwen3

    for module in (llama, mistral, qwen2, qwen3, phi3, gemma3):
        register(module.FAMILY)
    for name in _MORE:
        register(importlib.import_module(f"llm_model_parts.families.{name}").FAMILY)


# Families of the second wave (issue 6), one module each.
_MORE = (
    "falcon",
    "gpt2",
    "gptj",
    "opt",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v3",
    "llama4",
)


def supported_architectures() -> list[str]:
    """The `model_type`s this package can build, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_family(model_type: object) -> Family:
    _load_builtin()
    if not isinstance(model_type, str) or model_type not in _REGISTRY:
        raise ValueError(
            f"config.json model_type {model_type!r} is not supported by llm_model_parts; "
            f"supported: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[model_type]
