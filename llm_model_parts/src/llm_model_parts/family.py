"""What a model family is (`Family`: its config class, how to build a layer, begin and end) and the registry
`get_family` looks families up in. The families themselves are in `families/`, one file each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from torch import nn

from llm_model_parts.config import ModelConfig
from llm_model_parts.layers.ends import Begin, End
from llm_model_parts.layers.norm import RMSNorm

C = TypeVar("C", bound=ModelConfig)


def default_begin(config: ModelConfig) -> nn.Module:
    """Llama's begin: `embed_tokens`."""
    return Begin(config.vocab_size, config.hidden_size)


def default_end(config: ModelConfig) -> nn.Module:
    """Llama's end: `norm` (RMSNorm), `lm_head`."""
    return End(RMSNorm(config.hidden_size, eps=config.rms_norm_eps), config.hidden_size, config.vocab_size)


def no_scale(config: ModelConfig) -> float:
    return 1.0


@dataclass(frozen=True)
class Family(Generic[C]):
    """How to build one architecture's part models from its config (an instance of `config_class`).

    `build_layer(config, i)` makes decoder layer i with HF's submodule names; `build_begin` / `build_end` make
    a `layers.ends.Begin` / `End` whose children carry HF's names (`embed_tokens`, `norm`, `lm_head`; GPT-2's
    `wte`, `wpe`, `ln_f` ...); `embed_scale` multiplies the token embeddings.
    """

    model_type: str
    config_class: type[C]
    build_layer: Callable[[C, int], nn.Module]
    build_begin: Callable[[C], nn.Module] = default_begin
    build_end: Callable[[C], nn.Module] = default_end
    embed_scale: Callable[[C], float] = no_scale


_REGISTRY: dict[str, Family[Any]] = {}


def register(family: Family[Any]) -> Family[Any]:
    """Add a family (the built-in ones are added by `llm_model_parts.families`; other packages may add theirs,
    with a config class registered under the same `model_type`)."""
    _REGISTRY[family.model_type] = family
    return family


def registered() -> list[str]:
    return sorted(_REGISTRY)


def lookup(model_type: object) -> Family[Any]:
    if not isinstance(model_type, str) or model_type not in _REGISTRY:
        raise ValueError(
            f"config.json model_type {model_type!r} is not supported by llm_model_parts; "
            f"supported: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[model_type]
