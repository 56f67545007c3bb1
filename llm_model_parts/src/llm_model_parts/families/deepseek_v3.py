"""DeepSeek-V3 (and R1): multi-head latent attention with a compressed KV cache, YaRN RoPE with mscale on the
`qk_rope_head_dim` features (interleaved pairs), dense MLPs on the first `first_k_dense_replace` layers, then
MoE layers: sigmoid scores, group-limited top-k with `e_score_correction_bias`, shared experts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from llm_model_parts.config import ModelConfig, absent_except
from llm_model_parts.config_checks import non_negative, positive
from llm_model_parts.family import Family
from llm_model_parts.layers.block import DecoderLayer
from llm_model_parts.layers.mla import MLAttention
from llm_model_parts.layers.mlp import GatedMLP
from llm_model_parts.layers.moe import DeepseekMoe, DeepseekTopkRouter
from llm_model_parts.layers.norm import RMSNorm


@dataclass(frozen=True)
class DeepseekV3Config(ModelConfig, model_type="deepseek_v3"):
    """HF's DeepseekV3Config. `head_dim` is `qk_rope_head_dim` (the RoPE tables' width), as it sets it."""

    hf_defaults: ClassVar[dict[str, Any]] = {
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
    }
    hf_aliases: ClassVar[dict[str, str]] = {"num_local_experts": "n_routed_experts"}
    hf_absent: ClassVar[dict[str, Any]] = absent_except("attention_bias")

    moe_intermediate_size: int = positive(2048)
    n_shared_experts: int = non_negative(1)
    n_routed_experts: int = positive(256)
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = positive(512)
    q_lora_rank: int | None = positive(1536)
    qk_rope_head_dim: int = positive(64)
    v_head_dim: int = positive(128)
    qk_nope_head_dim: int = positive(128)
    n_group: int = positive(8)
    topk_group: int = positive(4)
    num_experts_per_tok: int = positive(8)
    first_k_dense_replace: int = non_negative(3)
    norm_topk_prob: bool = True
    rope_interleave: bool = True

    @classmethod
    def derive(cls, config: dict[str, Any]) -> dict[str, Any]:
        for name in ("topk_method", "scoring_func"):  # older checkpoints' fields; V3 is noaux_tc / sigmoid
            value = config.get(name)
            if value is not None and value not in ("noaux_tc", "sigmoid"):
                raise ValueError(
                    f"config field {name}={value!r} is not supported (DeepSeek-V3 uses noaux_tc / sigmoid)"
                )
        # MLA has no KV heads (one latent is shared by all heads): the cache sees one, the check none
        return {**config, "head_dim": config["qk_rope_head_dim"], "num_key_value_heads": None}


def build_mlp(config: DeepseekV3Config, i: int) -> nn.Module:
    if i < config.first_k_dense_replace:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
    router = DeepseekTopkRouter(
        config.hidden_size,
        config.n_routed_experts,
        config.num_experts_per_tok,
        config.n_group,
        config.topk_group,
        config.norm_topk_prob,
        config.routed_scaling_factor,
    )
    return DeepseekMoe(
        config.hidden_size, config.moe_intermediate_size, config.n_shared_experts, config.hidden_act, router
    )


def build_layer(config: DeepseekV3Config, i: int) -> nn.Module:
    h, eps = config.hidden_size, config.rms_norm_eps
    return DecoderLayer(
        MLAttention(config, i), build_mlp(config, i), RMSNorm(h, eps=eps), RMSNorm(h, eps=eps)
    )


FAMILY = Family(model_type="deepseek_v3", config_class=DeepseekV3Config, build_layer=build_layer)
