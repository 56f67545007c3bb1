"""Llama 4 text layers (Scout, Maverick): RoPE layers with chunked local attention and an L2 QK-norm, NoPE
layers every `no_rope_layer_interval` with full attention and query temperature tuning, MoE layers (top-k
router scaling the expert input, a shared expert) interleaved with dense ones every
`interleave_moe_layer_step`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from llm_model_parts.config import ModelConfig
from llm_model_parts.families import Family
from llm_model_parts.layers.attention import KV
from llm_model_parts.layers.attention_variants import VariantAttention
from llm_model_parts.layers.mlp import GatedMLP
from llm_model_parts.layers.moe import Llama4Moe
from llm_model_parts.layers.norm import RMSNorm
from llm_model_parts.step import Step


def uses_rope(raw: Mapping[str, Any], i: int) -> bool:
    flags = raw.get("no_rope_layers")
    if flags:
        return bool(flags[i])
    interval = int(raw.get("no_rope_layer_interval") or 4)
    return (i + 1) % interval != 0


def is_moe(raw: Mapping[str, Any], i: int) -> bool:
    layers = raw.get("moe_layers")
    if layers is None:
        step = int(raw.get("interleave_moe_layer_step") or 1)
        layers = range(step - 1, int(raw["num_hidden_layers"]), step)
    return i in layers


def is_chunked(raw: Mapping[str, Any], i: int) -> bool:
    types = raw.get("layer_types")
    if types:
        return types[i] == "chunked_attention"
    return uses_rope(raw, i) and raw.get("attention_chunk_size") is not None


class Llama4TextDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, i: int) -> None:
        super().__init__()
        raw, h, eps = config.raw, config.hidden_size, config.rms_norm_eps
        rope = uses_rope(raw, i)
        temperature = None
        if raw.get("attn_temperature_tuning", True) and not rope:
            temperature = (float(raw.get("attn_scale", 0.1)), float(raw.get("floor_scale", 8192)))
        self.self_attn = VariantAttention(
            config,
            i,
            rope="interleaved" if rope else None,
            chunk_size=int(raw.get("attention_chunk_size") or 8192) if is_chunked(raw, i) else None,
            l2_qk_norm=eps if raw.get("use_qk_norm", True) and rope else None,
            temperature=temperature,
            qkv_bias=config.attention_bias,
            o_bias=config.attention_bias,
        )
        self.is_moe_layer = is_moe(raw, i)
        if self.is_moe_layer:
            self.feed_forward: nn.Module = Llama4Moe(
                h,
                config.intermediate_size,
                int(raw.get("num_local_experts") or 16),
                int(raw.get("num_experts_per_tok") or 1),
                config.hidden_act,
            )
        else:
            self.feed_forward = GatedMLP(h, int(raw.get("intermediate_size_mlp") or 16384), config.hidden_act)
        self.input_layernorm = RMSNorm(h, eps=eps)
        self.post_attention_layernorm = RMSNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, step: Step, kv: KV | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), step, kv)
        return h + self.feed_forward(self.post_attention_layernorm(h))


def layer_types(config: Mapping[str, Any]) -> list[str]:
    """Every layer reads the one RoPE table ("full_attention"); chunking and NoPE are per layer (above)."""
    return ["full_attention"] * int(config["num_hidden_layers"])


FAMILY = Family(
    model_type="llama4_text",
    build_layer=Llama4TextDecoderLayer,
    defaults={
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "head_dim": 128,
        "attention_chunk_size": 8192,
    },
    layer_types=layer_types,
)
