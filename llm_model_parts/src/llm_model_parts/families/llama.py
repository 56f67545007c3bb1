"""Llama 2/3/3.1/3.2, SmolLM2, TinyLlama, Yi: pre-norm blocks, GQA, SiLU-gated MLP, any RoPE scaling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from llm_model_parts.config import ModelConfig, absent_except
from llm_model_parts.family import Family
from llm_model_parts.layers.attention import Attention
from llm_model_parts.layers.block import DecoderLayer
from llm_model_parts.layers.mlp import GatedMLP
from llm_model_parts.layers.norm import RMSNorm

# transformers' LlamaConfig defaults for the common fields
LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class LlamaConfig(ModelConfig, model_type="llama"):
    hf_defaults: ClassVar[dict[str, Any]] = LLAMA_DEFAULTS
    hf_absent: ClassVar[dict[str, Any]] = absent_except("attention_bias", "mlp_bias")


def build_layer(
    config: ModelConfig, i: int, *, qkv_bias: bool | None = None, qk_norm: bool = False
) -> nn.Module:
    """A Llama-style layer; Mistral and the Qwens reuse it with their own biases and QK-norm."""
    h, eps = config.hidden_size, config.rms_norm_eps
    attn = Attention(
        config,
        i,
        qkv_bias=config.attention_bias if qkv_bias is None else qkv_bias,
        o_bias=config.attention_bias,
        qk_norm=(lambda d: RMSNorm(d, eps=eps)) if qk_norm else None,
    )
    mlp = GatedMLP(h, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)
    return DecoderLayer(attn, mlp, RMSNorm(h, eps=eps), RMSNorm(h, eps=eps))


FAMILY = Family(model_type="llama", config_class=LlamaConfig, build_layer=build_layer)
