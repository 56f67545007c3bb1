"""Falcon: Falcon-7B (multi-query, attention and MLP in parallel on one LayerNorm), Falcon-40B/180B (the
"new decoder architecture": grouped KV heads interleaved in `query_key_value`, two LayerNorms `ln_attn` /
`ln_mlp`), Falcon-RW (sequential blocks, ALiBi). RoPE or ALiBi per `alibi`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from llm_model_parts.config import HIDDEN_ACTS, ModelConfig
from llm_model_parts.config_checks import choice, epsilon, positive
from llm_model_parts.family import Family
from llm_model_parts.layers.attention import KV
from llm_model_parts.layers.attention_variants import VariantAttention
from llm_model_parts.layers.ends import Begin, End
from llm_model_parts.layers.linear import Linear
from llm_model_parts.layers.mlp import activation
from llm_model_parts.step import Step


@dataclass(frozen=True)
class FalconConfig(ModelConfig, model_type="falcon"):
    """HF's FalconConfig; `num_key_value_heads`, `intermediate_size`, `hidden_act` and `rms_norm_eps` are
    derived from `num_kv_heads`, `ffn_hidden_size`, `activation` and `layer_norm_epsilon` as its model does."""

    hf_defaults: ClassVar[dict[str, Any]] = {
        "vocab_size": 65024,
        "hidden_size": 4544,
        "num_hidden_layers": 32,
        "num_attention_heads": 71,
        "max_position_embeddings": 2048,
        "bos_token_id": 11,
        "eos_token_id": 11,
        "tie_word_embeddings": True,
    }
    # `n_embed` is HF's; `n_layer` / `n_head` / `n_head_kv` are the older RW checkpoints' names
    hf_aliases: ClassVar[dict[str, str]] = {
        "n_embed": "hidden_size",
        "n_layer": "num_hidden_layers",
        "n_head": "num_attention_heads",
        "n_head_kv": "num_kv_heads",
    }

    num_ln_in_parallel_attn: int | None = positive(None)
    layer_norm_epsilon: float = epsilon(1e-5)
    num_kv_heads: int | None = positive(None)
    alibi: bool = False
    new_decoder_architecture: bool = False
    multi_query: bool = True
    parallel_attn: bool = True
    bias: bool = False
    ffn_hidden_size: int | None = positive(None)
    activation: str = choice(HIDDEN_ACTS, "gelu")

    @classmethod
    def derive(cls, config: dict[str, Any]) -> dict[str, Any]:
        heads = config["num_attention_heads"]
        kv = config["num_kv_heads"] or heads
        grouped = config["new_decoder_architecture"] or not config["multi_query"]
        return {
            **config,
            "num_kv_heads": kv,
            "num_key_value_heads": (kv if config["new_decoder_architecture"] else heads) if grouped else 1,
            "intermediate_size": config["ffn_hidden_size"] or 4 * config["hidden_size"],
            "hidden_act": config["activation"],
            "rms_norm_eps": config["layer_norm_epsilon"],
            "head_dim": None,  # hidden_size // num_attention_heads, as HF's property
        }


class FalconAttention(VariantAttention):
    def __init__(self, config: FalconConfig, i: int) -> None:
        self.new_decoder_architecture = config.new_decoder_architecture
        self.multi_query = config.multi_query
        alibi = config.alibi
        super().__init__(config, i, rope=None if alibi else "half", alibi=alibi, qkv_bias=config.bias)

    def _make_projections(self, config: ModelConfig, qkv_bias: bool, o_bias: bool) -> None:
        h, d = config.hidden_size, self.head_dim
        qkv = (self.num_heads + 2 * self.num_key_value_heads) * d
        if not self.new_decoder_architecture and not self.multi_query:
            qkv = 3 * h
        self.query_key_value = Linear(h, qkv, bias=qkv_bias)
        self.dense = Linear(h, h, bias=qkv_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        fused = self.query_key_value(x)
        d, heads, kv_heads = self.head_dim, self.num_heads, self.num_key_value_heads
        if self.new_decoder_architecture:
            # per KV group: its query heads, then its key, then its value
            qkv = fused.view(b, t, kv_heads, heads // kv_heads + 2, d)
            return qkv[:, :, :, :-2].reshape(b, t, heads, d), qkv[:, :, :, -2], qkv[:, :, :, -1]
        if self.multi_query:
            qkv = fused.view(b, t, heads + 2, d)
            return qkv[:, :, :-2], qkv[:, :, -2:-1], qkv[:, :, -1:]
        q, k, v = fused.view(b, t, heads, 3, d).unbind(3)
        return q, k, v

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class FalconMLP(nn.Module):
    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        bias = config.bias
        self.dense_h_to_4h = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.dense_4h_to_h = Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, config: FalconConfig, i: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_epsilon
        self.new_decoder_architecture = config.new_decoder_architecture
        self.parallel_attn = config.parallel_attn
        lns = config.num_ln_in_parallel_attn or (2 if self.new_decoder_architecture else 1)
        self.two_norms = self.new_decoder_architecture and lns == 2
        self.self_attention = FalconAttention(config, i)
        self.mlp = FalconMLP(config)
        if not self.parallel_attn:
            self.input_layernorm = nn.LayerNorm(h, eps=eps)
            self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        elif lns == 2:
            self.ln_attn = nn.LayerNorm(h, eps=eps)
            self.ln_mlp = nn.LayerNorm(h, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, step: Step, kv: KV | None = None) -> torch.Tensor:
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        attn = self.self_attention(attn_in, step, kv)
        if not self.new_decoder_architecture and not self.parallel_attn:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        return x + (self.mlp(mlp_in) + attn)


def build_begin(config: FalconConfig) -> nn.Module:
    return Begin(config.vocab_size, config.hidden_size, embed_name="word_embeddings")


def build_end(config: FalconConfig) -> nn.Module:
    norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
    return End(norm, config.hidden_size, config.vocab_size, norm_name="ln_f")


FAMILY = Family(
    model_type="falcon",
    config_class=FalconConfig,
    build_layer=FalconDecoderLayer,
    build_begin=build_begin,
    build_end=build_end,
)
