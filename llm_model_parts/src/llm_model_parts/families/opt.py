"""OPT: learned positions looked up at position + 2, ReLU MLP (`fc1`, `fc2`), LayerNorm before
(`do_layer_norm_before`, most sizes) or after (350m) each sub-block, optional `project_in` / `project_out`
when `word_embed_proj_dim` differs from `hidden_size`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llm_model_parts.config import ModelConfig
from llm_model_parts.families import Family
from llm_model_parts.layers.attention import KV
from llm_model_parts.layers.attention_variants import VariantAttention
from llm_model_parts.layers.ends import Begin, End
from llm_model_parts.layers.linear import Linear
from llm_model_parts.layers.mlp import activation
from llm_model_parts.step import Step

POSITION_OFFSET = 2  # OPT's embedding table starts two rows in (a fairseq padding convention)


class OPTAttention(VariantAttention):
    def __init__(self, config: ModelConfig, i: int) -> None:
        bias = bool(config.raw.get("enable_bias", True))
        super().__init__(config, i, rope=None, qkv_bias=bias, o_bias=bias)

    def _make_projections(self, config: ModelConfig, qkv_bias: bool, o_bias: bool) -> None:
        h = config.hidden_size
        self.q_proj = Linear(h, h, bias=qkv_bias)
        self.k_proj = Linear(h, h, bias=qkv_bias)
        self.v_proj = Linear(h, h, bias=qkv_bias)
        self.out_proj = Linear(h, h, bias=o_bias)

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(x)


def _layer_norm(config: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(
        config.hidden_size, elementwise_affine=bool(config.raw.get("layer_norm_elementwise_affine", True))
    )


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, i: int) -> None:
        super().__init__()
        bias = bool(config.raw.get("enable_bias", True))
        self.do_layer_norm_before = bool(config.raw.get("do_layer_norm_before", True))
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


def normalize(config: dict[str, Any]) -> dict[str, Any]:
    out = dict(config)
    out["intermediate_size"] = out.get("ffn_dim")
    out["hidden_act"] = out.get("activation_function") or "relu"
    out.pop("hidden_activation", None)
    out["num_key_value_heads"] = out.get("num_attention_heads")
    return out


def _projection(config: ModelConfig) -> int | None:
    width = int(config.raw.get("word_embed_proj_dim") or config.hidden_size)
    return width if width != config.hidden_size else None


def build_begin(config: ModelConfig) -> nn.Module:
    width = _projection(config)
    return Begin(
        config.vocab_size,
        width or config.hidden_size,
        positions_name="embed_positions",
        num_positions=config.max_position_embeddings,
        position_offset=POSITION_OFFSET,
        project_in=config.hidden_size if width else None,
    )


def build_end(config: ModelConfig) -> nn.Module:
    raw = config.raw
    final_norm = raw.get("do_layer_norm_before", True) and not raw.get("_remove_final_layer_norm", False)
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
    build_layer=OPTDecoderLayer,
    defaults={
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "ffn_dim": 3072,
        "max_position_embeddings": 2048,
        "activation_function": "relu",
        "tie_word_embeddings": True,
    },
    normalize=normalize,
    build_begin=build_begin,
    build_end=build_end,
)
