"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases) with sparse MoE layers every
`decoder_sparse_step` (except `mlp_only_layers`): softmax top-k routing and a shared expert scaled by a
sigmoid gate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from llm_model_parts.config import ModelConfig, explicit_or
from llm_model_parts.families import Family
from llm_model_parts.layers.attention import Attention
from llm_model_parts.layers.block import DecoderLayer
from llm_model_parts.layers.mlp import GatedMLP
from llm_model_parts.layers.moe import QwenSparseMoe
from llm_model_parts.layers.norm import RMSNorm


def num_experts(config: ModelConfig) -> int:
    """`num_experts` (Qwen2-MoE's name) or `num_local_experts` (what transformers 5 writes for Qwen3-MoE)."""
    raw = config.raw
    return int(raw.get("num_experts", raw.get("num_local_experts")) or 0)


def is_sparse(config: ModelConfig, i: int) -> bool:
    raw = config.raw
    step = int(raw.get("decoder_sparse_step") or 1)
    experts = num_experts(config)
    return i not in (raw.get("mlp_only_layers") or []) and experts > 0 and (i + 1) % step == 0


def moe_mlp(config: ModelConfig, i: int, *, shared: bool) -> nn.Module:
    raw = config.raw
    if not is_sparse(config, i):
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
    return QwenSparseMoe(
        config.hidden_size,
        int(raw["moe_intermediate_size"]),
        num_experts(config),
        int(raw.get("num_experts_per_tok") or 4),
        config.hidden_act,
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        shared_intermediate=int(raw.get("shared_expert_intermediate_size") or 0) if shared else 0,
    )


def build_layer(config: ModelConfig, i: int) -> nn.Module:
    h, eps = config.hidden_size, config.rms_norm_eps
    attn = Attention(config, i, qkv_bias=bool(config.raw.get("qkv_bias", True)))
    return DecoderLayer(attn, moe_mlp(config, i, shared=True), RMSNorm(h, eps=eps), RMSNorm(h, eps=eps))


def layer_types(config: Mapping[str, Any]) -> list[str]:
    """Qwen2-MoE slides the window on odd layers below `max_window_layers` when `use_sliding_window`."""
    n = int(config["num_hidden_layers"])
    first = int(config.get("max_window_layers") or 0)
    on = bool(config.get("use_sliding_window"))
    default = [
        "sliding_attention" if on and (i + 1) % 2 and i < first else "full_attention" for i in range(n)
    ]
    return explicit_or(config, default)


FAMILY = Family(
    model_type="qwen2_moe",
    build_layer=build_layer,
    defaults={
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "max_window_layers": 28,
        "max_position_embeddings": 32768,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "decoder_sparse_step": 1,
    },
    layer_types=layer_types,
)
