"""Gemma 3 (text): sliding and global layers with their own RoPE, QK-norm, GELU-tanh MLP, four norms per
layer (`1 + weight` RMSNorm), embeddings scaled by sqrt(hidden_size)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from llm_model_parts.config import HIDDEN_ACTS, ModelConfig, RopeParameters, absent_except, explicit_or
from llm_model_parts.config_checks import choice
from llm_model_parts.family import Family
from llm_model_parts.layers.attention import KV, Attention
from llm_model_parts.layers.ends import End
from llm_model_parts.layers.mlp import GatedMLP
from llm_model_parts.layers.norm import GemmaRMSNorm
from llm_model_parts.step import Step


class Gemma3DecoderLayer(nn.Module):
    """Norms before and after both the attention and the MLP."""

    def __init__(self, config: ModelConfig, i: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        scalar = config.query_pre_attn_scalar or config.head_dim
        self.self_attn = Attention(
            config,
            i,
            qkv_bias=config.attention_bias,
            o_bias=config.attention_bias,
            qk_norm=lambda d: GemmaRMSNorm(d, eps=eps),
            scaling=float(scalar) ** -0.5,
            softcap=None,  # transformers' Gemma 3 ignores attn_logit_softcapping; so do we, to stay equal
        )
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act)
        self.input_layernorm = GemmaRMSNorm(h, eps=eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps=eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps=eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, step: Step, kv: KV | None = None) -> torch.Tensor:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), step, kv))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


def layer_types(config: Mapping[str, Any]) -> list[str]:
    if config["use_bidirectional_attention"]:
        raise ValueError("config field use_bidirectional_attention=true is not supported (causal LMs only)")
    pattern = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6)
    n = int(config["num_hidden_layers"])
    default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    return explicit_or(config, default)


def rope_parameters(config: Mapping[str, Any]) -> dict[str, RopeParameters]:
    """transformers 5: `rope_parameters` nested by layer type. Before: `rope_theta` (global layers),
    `rope_local_base_freq` (sliding layers) and `rope_scaling` (global layers only)."""
    params = config.get("rope_parameters") or {}
    nested = isinstance(params, Mapping) and ("full_attention" in params or "sliding_attention" in params)
    full: dict[str, Any] = dict(params["full_attention"] or {}) if nested else {}
    local: dict[str, Any] = dict(params.get("sliding_attention") or {}) if nested else {}
    if not nested and isinstance(params, Mapping):
        full.update(params)
    if isinstance(config.get("rope_scaling"), Mapping):
        full = {**config["rope_scaling"], **full}
    full.setdefault("rope_theta", config.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_type", "default")
    local.setdefault("rope_theta", config.get("rope_local_base_freq", 10_000.0))
    return {
        "full_attention": RopeParameters.from_dict(full, "rope_parameters.full_attention"),
        "sliding_attention": RopeParameters.from_dict(local, "rope_parameters.sliding_attention"),
    }


@dataclass(frozen=True)
class Gemma3TextConfig(ModelConfig, model_type="gemma3_text"):
    hf_defaults: ClassVar[dict[str, Any]] = {
        "vocab_size": 262208,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
    }

    hf_absent: ClassVar[dict[str, Any]] = absent_except(
        "attention_bias", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"
    )

    hidden_activation: str = choice(HIDDEN_ACTS, "gelu_pytorch_tanh")
    use_bidirectional_attention: bool = False

    @classmethod
    def derive(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {**config, "hidden_act": config["hidden_activation"]}

    @classmethod
    def hf_layer_types(cls, config: Mapping[str, Any]) -> list[str]:
        return layer_types(config)

    @classmethod
    def hf_rope_parameters(cls, config: Mapping[str, Any]) -> dict[str, RopeParameters]:
        return rope_parameters(config)


def build_end(config: ModelConfig) -> nn.Module:
    norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    return End(norm, config.hidden_size, config.vocab_size)


FAMILY = Family(
    model_type="gemma3_text",
    config_class=Gemma3TextConfig,
    build_layer=Gemma3DecoderLayer,
    build_end=build_end,
    embed_scale=lambda config: config.hidden_size**0.5,
)
