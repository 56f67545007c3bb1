"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases) with sparse MoE layers every
`decoder_sparse_step` (except `mlp_only_layers`): softmax top-k routing and a shared expert scaled by a
sigmoid gate."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from llm_model_parts.config import ModelConfig, explicit_or
from llm_model_parts.config_checks import non_negative, positive
from llm_model_parts.families.qwen2 import QWEN_DEFAULTS
from llm_model_parts.family import Family
from llm_model_parts.layers.attention import Attention
from llm_model_parts.layers.block import DecoderLayer
from llm_model_parts.layers.mlp import GatedMLP
from llm_model_parts.layers.moe import QwenSparseMoe
from llm_model_parts.layers.norm import RMSNorm


@dataclass(frozen=True)
class QwenMoeConfig(ModelConfig):
    """The MoE fields Qwen2-MoE and Qwen3-MoE share (Qwen2-MoE's defaults; Qwen3-MoE overrides them)."""

    use_sliding_window: bool = False
    decoder_sparse_step: int = positive(1)
    moe_intermediate_size: int = positive(1408)
    num_experts_per_tok: int = positive(4)
    num_experts: int = positive(60)
    norm_topk_prob: bool = False
    mlp_only_layers: tuple[int, ...] = ()

    def is_sparse(self, i: int) -> bool:
        step = self.decoder_sparse_step
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % step == 0


@dataclass(frozen=True)
class Qwen2MoeConfig(QwenMoeConfig, model_type="qwen2_moe"):
    hf_defaults: ClassVar[dict[str, Any]] = {
        **QWEN_DEFAULTS,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
    }

    max_window_layers: int = non_negative(28)
    shared_expert_intermediate_size: int = positive(5632)
    qkv_bias: bool = True

    @classmethod
    def hf_layer_types(cls, config: Mapping[str, Any]) -> list[str]:
        """Qwen2-MoE slides the window on odd layers below `max_window_layers` when `use_sliding_window`."""
        n, first, on = config["num_hidden_layers"], config["max_window_layers"], config["use_sliding_window"]
        return explicit_or(
            config,
            ["sliding_attention" if on and (i + 1) % 2 and i < first else "full_attention" for i in range(n)],
        )


def moe_mlp(config: QwenMoeConfig, i: int, *, shared_intermediate: int = 0) -> nn.Module:
    if not config.is_sparse(i):
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
    return QwenSparseMoe(
        config.hidden_size,
        config.moe_intermediate_size,
        config.num_experts,
        config.num_experts_per_tok,
        config.hidden_act,
        norm_topk_prob=config.norm_topk_prob,
        shared_intermediate=shared_intermediate,
    )


def build_layer(config: Qwen2MoeConfig, i: int) -> nn.Module:
    h, eps = config.hidden_size, config.rms_norm_eps
    attn = Attention(config, i, qkv_bias=config.qkv_bias)
    mlp = moe_mlp(config, i, shared_intermediate=config.shared_expert_intermediate_size)
    return DecoderLayer(attn, mlp, RMSNorm(h, eps=eps), RMSNorm(h, eps=eps))


FAMILY = Family(model_type="qwen2_moe", config_class=Qwen2MoeConfig, build_layer=build_layer)
