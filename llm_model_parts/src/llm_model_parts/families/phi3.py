"""Phi-3 / Phi-4: fused `qkv_proj` and `gate_up_proj`, partial rotary, LongRoPE, optional sliding window."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from llm_model_parts.config import ModelConfig, RopeParameters, standard_rope
from llm_model_parts.config_checks import positive
from llm_model_parts.families.mistral import window_on_every_layer
from llm_model_parts.family import Family
from llm_model_parts.layers.attention import Attention
from llm_model_parts.layers.block import DecoderLayer
from llm_model_parts.layers.linear import Linear
from llm_model_parts.layers.mlp import FusedGatedMLP
from llm_model_parts.layers.norm import RMSNorm


class Phi3Attention(Attention):
    """One `qkv_proj` whose output is [q | k | v]."""

    def _make_projections(self, config: ModelConfig, qkv_bias: bool, o_bias: bool) -> None:
        q_out = self.num_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, q_out + 2 * self.kv_width, bias=qkv_bias)
        self.o_proj = Linear(q_out, config.hidden_size, bias=o_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).split(
            [self.num_heads * self.head_dim, self.kv_width, self.kv_width], dim=-1
        )
        shape_kv = (b, t, self.num_key_value_heads, self.head_dim)
        return q.view(b, t, self.num_heads, self.head_dim), k.view(shape_kv), v.view(shape_kv)


def build_layer(config: ModelConfig, i: int) -> nn.Module:
    h, eps = config.hidden_size, config.rms_norm_eps
    attn = Phi3Attention(config, i)
    mlp = FusedGatedMLP(h, config.intermediate_size, config.hidden_act)
    return DecoderLayer(attn, mlp, RMSNorm(h, eps=eps), RMSNorm(h, eps=eps))


def rope_parameters(config: Mapping[str, Any]) -> dict[str, RopeParameters]:
    raw = dict(config)
    for key in ("rope_scaling", "rope_parameters"):
        scaling = raw.get(key)
        # Phi-3 checkpoints name LongRoPE "su" (and some "yarn"); transformers reads both as longrope.
        if isinstance(scaling, Mapping) and (scaling.get("rope_type") or scaling.get("type")) in (
            "su",
            "yarn",
        ):
            raw[key] = {**scaling, "rope_type": "longrope", "type": "longrope"}
    rope = standard_rope(raw)
    return {"full_attention": rope, "sliding_attention": rope}


@dataclass(frozen=True)
class Phi3Config(ModelConfig, model_type="phi3"):
    hf_defaults: ClassVar[dict[str, Any]] = {
        "vocab_size": 32064,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 32000,
        "pad_token_id": 32000,
    }

    original_max_position_embeddings: int = positive(4096)

    @classmethod
    def hf_layer_types(cls, config: Mapping[str, Any]) -> list[str]:
        return window_on_every_layer(config)

    @classmethod
    def hf_rope_parameters(cls, config: Mapping[str, Any]) -> dict[str, RopeParameters]:
        return rope_parameters(config)


FAMILY = Family(model_type="phi3", config_class=Phi3Config, build_layer=build_layer)
