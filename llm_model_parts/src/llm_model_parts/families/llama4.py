"""Llama 4 text layers (Scout, Maverick): RoPE layers with chunked local attention and an L2 QK-norm, NoPE
layers every `no_rope_layer_interval` with full attention and query temperature tuning, MoE layers (top-k
router scaling the expert input, a shared expert) interleaved with dense ones every
`interleave_moe_layer_step`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from llm_model_parts.config import ModelConfig, absent_except
from llm_model_parts.config_checks import positive
from llm_model_parts.families.llama import LLAMA_DEFAULTS
from llm_model_parts.family import Family
from llm_model_parts.layers.attention import KV
from llm_model_parts.layers.attention_variants import VariantAttention
from llm_model_parts.layers.mlp import GatedMLP
from llm_model_parts.layers.moe import Llama4Moe
from llm_model_parts.layers.norm import RMSNorm
from llm_model_parts.step import Step


@dataclass(frozen=True)
class Llama4TextConfig(ModelConfig, model_type="llama4_text"):
    """HF's Llama4TextConfig. Its `layer_types` ("chunked_attention" / "full_attention") become
    `chunked_layers`; `layer_types` here says which RoPE table a layer reads (all the one table)."""

    hf_defaults: ClassVar[dict[str, Any]] = {
        **LLAMA_DEFAULTS,
        "vocab_size": 202048,
        "hidden_size": 5120,
        "intermediate_size": 8192,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,  # Llama4TextConfig.default_theta
    }

    hf_absent: ClassVar[dict[str, Any]] = absent_except("attention_bias")

    intermediate_size_mlp: int = positive(16384)
    num_experts_per_tok: int = positive(1)
    num_local_experts: int = positive(16)
    moe_layers: tuple[int, ...] | None = None
    interleave_moe_layer_step: int = positive(1)
    use_qk_norm: bool = True
    no_rope_layers: tuple[int, ...] | None = None
    no_rope_layer_interval: int = positive(4)
    attention_chunk_size: int | None = positive(8192)
    attn_temperature_tuning: bool = True
    floor_scale: float = positive(8192)
    attn_scale: float = 0.1
    chunked_layers: tuple[bool, ...] = ()  # derived from HF's layer_types

    @classmethod
    def derive(cls, config: dict[str, Any]) -> dict[str, Any]:
        """HF's __post_init__: `no_rope_layers` (1 = the layer uses RoPE), `moe_layers`, `layer_types`."""
        n, interval, step = (
            config["num_hidden_layers"],
            config["no_rope_layer_interval"],
            config["interleave_moe_layer_step"],
        )
        no_rope = config["no_rope_layers"] or tuple(int((i + 1) % interval != 0) for i in range(n))
        moe = config["moe_layers"] if config["moe_layers"] is not None else tuple(range(step - 1, n, step))
        hf_types = config.get("layer_types") or [
            "chunked_attention" if r else "full_attention" for r in no_rope
        ]
        if len(no_rope) != n or len(hf_types) != n:
            raise ValueError(f"config fields no_rope_layers and layer_types must have {n} entries")
        chunked = tuple(t == "chunked_attention" for t in hf_types)
        return {**config, "no_rope_layers": tuple(no_rope), "moe_layers": moe, "chunked_layers": chunked}

    @classmethod
    def hf_layer_types(cls, config: Mapping[str, Any]) -> list[str]:
        """Every layer reads the one RoPE table; chunking and NoPE are per layer (`chunked_layers` ...)."""
        return ["full_attention"] * config["num_hidden_layers"]


class Llama4TextDecoderLayer(nn.Module):
    def __init__(self, config: Llama4TextConfig, i: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        assert config.no_rope_layers is not None and config.moe_layers is not None  # set by derive
        rope = bool(config.no_rope_layers[i])
        temperature = None
        if config.attn_temperature_tuning and not rope:
            temperature = (config.attn_scale, config.floor_scale)
        chunked = config.chunked_layers[i] and config.attention_chunk_size is not None
        self.self_attn = VariantAttention(
            config,
            i,
            rope="interleaved" if rope else None,
            chunk_size=config.attention_chunk_size if chunked else None,
            l2_qk_norm=eps if config.use_qk_norm and rope else None,
            temperature=temperature,
            qkv_bias=config.attention_bias,
            o_bias=config.attention_bias,
        )
        self.is_moe_layer = i in config.moe_layers
        if self.is_moe_layer:
            self.feed_forward: nn.Module = Llama4Moe(
                h,
                config.intermediate_size,
                config.num_local_experts,
                config.num_experts_per_tok,
                config.hidden_act,
            )
        else:
            self.feed_forward = GatedMLP(h, config.intermediate_size_mlp, config.hidden_act)
        self.input_layernorm = RMSNorm(h, eps=eps)
        self.post_attention_layernorm = RMSNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, step: Step, kv: KV | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), step, kv)
        return h + self.feed_forward(self.post_attention_layernorm(h))


FAMILY = Family(model_type="llama4_text", config_class=Llama4TextConfig, build_layer=Llama4TextDecoderLayer)
