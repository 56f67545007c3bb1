"""OPT: learned positions looked up at position + 2, ReLU MLP (`fc1`, `fc2`), LayerNorm before
(`do_layer_norm_before`, most sizes) or after (350m) each sub-block, optional `project_in` / `project_out`
when `word_embed_proj_dim` differs from `hidden_size`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from llm_model_parts.config import HIDDEN_ACTS, ModelConfig
from llm_model_parts.config_checks import choice, positive
from llm_model_parts.family import Family
from llm_model_parts.layers.attention import KV
from llm_model_parts.layers.attention_variants import VariantAttention
from llm_model_parts.layers.ends import Begin, End
from llm_model_parts.layers.linear import Linear
from llm_model_parts.layers.mlp import activation
from llm_model_parts.step import Step

POSITION_OFFSET = 2  # OPT's embedding table starts two rows in (a fairseq padding convention)


@dataclass(frozen=True)
class OPTConfig(ModelConfig, model_type="opt"):
    """HF's OPTConfig. Its LayerNorms use torch's default epsilon (1e-5); `rms_norm_eps` holds it."""

    hf_defaults: ClassVar[dict[str, Any]] = {
        "vocab_size": 50272,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 2048,
        "pad_token_id": 1,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "tie_word_embeddings": True,
    }

    ffn_dim: int = positive(3072)
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = positive(None)
    activation_function: str = choice(HIDDEN_ACTS, "relu")
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True

    @classmethod
    def derive(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {
            **config,
            "word_embed_proj_dim": config["word_embed_proj_dim"] or config["hidden_size"],
            "intermediate_size": config["ffn_dim"],
            "hidden_act": config["activation_function"],
            "num_key_value_heads": config["num_attention_heads"],
            "rms_norm_eps": 1e-5,
            "head_dim": None,
        }


class OPTAttention(VariantAttention):
    def __init__(self, config: OPTConfig, i: int) -> None:
        bias = config.enable_bias
        super().__init__(config, i, rope=None, qkv_bias=bias, o_bias=bias)

    def _make_projections(self, config: ModelConfig, qkv_bias: bool, o_bias: bool) -> None:
        h = config.hidden_size
        self.q_proj = Linear(h, h, bias=qkv_bias)
        self.k_proj = Linear(h, h, bias=qkv_bias)
        self.v_proj = Linear(h, h, bias=qkv_bias)
        self.out_proj = Linear(h, h, bias=o_bias)

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(x)


def _layer_norm(config: OPTConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, elementwise_affine=config.layer_norm_elementwise_affine)


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig, i: int) -> None:
        super().__init__()
        bias = config.enable_bias
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, i)
        self.self_attn_layer_norm = _layer_norm(config)
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.final_layer_norm = _layer_norm(config)
        self.activation_fn = activation(config.hidden_act)

    def forward(self, x: torch.Tensor, step: Step, kv: KV | None = None) -> torch.Tensor:
        before = self.do_layer_norm_before
        h = x + self.self_attn(self.self_attn_layer_norm(x) if before else x, step, kv)
        if not before:
            h = self.self_attn_layer_norm(h)
        out = h + self.fc2(self.activation_fn(self.fc1(self.final_layer_norm(h) if before else h)))
        return out if before else self.final_layer_norm(out)


def _projection(config: OPTConfig) -> int | None:
    width = config.word_embed_proj_dim or config.hidden_size
    return width if width != config.hidden_size else None


def build_begin(config: OPTConfig) -> nn.Module:
    width = _projection(config)
    return Begin(
        config.vocab_size,
        width or config.hidden_size,
        positions_name="embed_positions",
        num_positions=config.max_position_embeddings,
        position_offset=POSITION_OFFSET,
        project_in=config.hidden_size if width else None,
    )


def build_end(config: OPTConfig) -> nn.Module:
    final_norm = config.do_layer_norm_before and not config._remove_final_layer_norm
    norm = _layer_norm(config) if final_norm else None
    return End(
        norm,
        config.hidden_size,
        config.vocab_size,
        norm_name="final_layer_norm",
        project_out=_projection(config),
    )


FAMILY = Family(
    model_type="opt",
    config_class=OPTConfig,
    build_layer=OPTDecoderLayer,
    build_begin=build_begin,
    build_end=build_end,
)
