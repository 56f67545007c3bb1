"""DeepSeek-V3 (and R1): multi-head latent attention with a compressed KV cache, YaRN RoPE with mscale on the
`qk_rope_head_dim` features (interleaved pairs), dense MLPs on the first `first_k_dense_replace` layers, then
MoE layers: sigmoid scores, group-limited top-k with `e_score_correction_bias`, shared experts."""

from __future__ import annotations

from typing import Any

from torch import nn

from llm_model_parts.config import ModelConfig
from llm_model_parts.families import Family
from llm_model_parts.layers.block import DecoderLayer
from llm_model_parts.layers.mla import MLAttention
from llm_model_parts.layers.mlp import GatedMLP
from llm_model_parts.layers.moe import DeepseekMoe, DeepseekTopkRouter
from llm_model_parts.layers.norm import RMSNorm


def build_mlp(config: ModelConfig, i: int) -> nn.Module:
    raw = config.raw
    if i < int(raw.get("first_k_dense_replace") or 0):
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
    router = DeepseekTopkRouter(
        config.hidden_size,
        int(raw.get("n_routed_experts", raw.get("num_local_experts")) or 0),
        int(raw.get("num_experts_per_tok") or 8),
        int(raw.get("n_group") or 1),
        int(raw.get("topk_group") or 1),
        bool(raw.get("norm_topk_prob", True)),
        float(raw.get("routed_scaling_factor") or 1.0),
    )
    return DeepseekMoe(
        config.hidden_size,
        int(raw["moe_intermediate_size"]),
        int(raw.get("n_shared_experts") or 0),
        config.hidden_act,
        router,
    )


def build_layer(config: ModelConfig, i: int) -> nn.Module:
    h, eps = config.hidden_size, config.rms_norm_eps
    return DecoderLayer(
        MLAttention(config, i), build_mlp(config, i), RMSNorm(h, eps=eps), RMSNorm(h, eps=eps)
    )


def normalize(config: dict[str, Any]) -> dict[str, Any]:
    out = dict(config)
    out["head_dim"] = out.get("qk_rope_head_dim")  # the RoPE tables' width, as transformers sets it
    out.pop("num_key_value_heads", None)  # MLA has no KV heads; the latent is shared
    for name in ("topk_method", "scoring_func"):
        value = out.get(name)
        if value is not None and value not in ("noaux_tc", "sigmoid"):
            raise ValueError(
                f"config field {name}={value!r} is not supported (DeepSeek-V3 uses noaux_tc / sigmoid)"
            )
    return out


FAMILY = Family(
    model_type="deepseek_v3",
    build_layer=build_layer,
    defaults={
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "first_k_dense_replace": 3,
        "n_group": 8,
        "topk_group": 4,
        "num_experts_per_tok": 8,
        "routed_scaling_factor": 2.5,
        "rope_interleave": True,
    },
    normalize=normalize,
)
