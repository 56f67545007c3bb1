"""Falcon: Falcon-7B (multi-query, attention and MLP in parallel on one LayerNorm), Falcon-40B/180B (the
"new decoder architecture": grouped KV heads interleaved in `query_key_value`, two LayerNorms `ln_attn` /
`ln_mlp`), Falcon-RW (sequential blocks, ALiBi). RoPE or ALiBi per `alibi`."""

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


class FalconAttention(VariantAttention):
    def __init__(self, config: ModelConfig, i: int) -> None:
        raw = config.raw
        self.new_decoder_architecture = bool(raw.get("new_decoder_architecture"))
        self.multi_query = bool(raw.get("multi_query", True))
        alibi = bool(raw.get("alibi"))
        super().__init__(
            config, i, rope=None if alibi else "half", alibi=alibi, qkv_bias=bool(raw.get("bias"))
        )

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
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        bias = bool(config.raw.get("bias"))
        self.dense_h_to_4h = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.dense_4h_to_h = Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, i: int) -> None:
        super().__init__()
        raw, h, eps = config.raw, config.hidden_size, config.rms_norm_eps
        self.new_decoder_architecture = bool(raw.get("new_decoder_architecture"))
        self.parallel_attn = bool(raw.get("parallel_attn", True))
        lns = raw.get("num_ln_in_parallel_attn") or (2 if self.new_decoder_architecture else 1)
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


def normalize(config: dict[str, Any]) -> dict[str, Any]:
    """Falcon's config names (and the older RW ones: `n_layer`, `n_head`, `n_head_kv`) -> the common ones."""
    out = dict(config)
    for ours, theirs in (("num_hidden_layers", "n_layer"), ("num_attention_heads", "n_head")):
        if out.get(ours) is None and out.get(theirs) is not None:
            out[ours] = out[theirs]
    heads = out.get("num_attention_heads")
    new = bool(out.get("new_decoder_architecture"))
    kv = out.get("num_kv_heads", out.get("n_head_kv"))
    if new or not out.get("multi_query", True):
        out["num_key_value_heads"] = kv if (new and kv) else heads
    else:
        out["num_key_value_heads"] = 1
    if out.get("hidden_size") is not None:
        out["intermediate_size"] = out.get("ffn_hidden_size") or 4 * int(out["hidden_size"])
    out["rms_norm_eps"] = out.get("layer_norm_epsilon", 1e-5)
    out["hidden_act"] = out.get("activation") or "gelu"
    out.pop("hidden_activation", None)
    out.pop("head_dim", None)
    return out


def build_begin(config: ModelConfig) -> nn.Module:
    return Begin(config.vocab_size, config.hidden_size, embed_name="word_embeddings")


def build_end(config: ModelConfig) -> nn.Module:
    norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
    return End(norm, config.hidden_size, config.vocab_size, norm_name="ln_f")


FAMILY = Family(
    model_type="falcon",
    build_layer=FalconDecoderLayer,
    defaults={
        "hidden_size": 4544,
        "num_hidden_layers": 32,
        "num_attention_heads": 71,
        "layer_norm_epsilon": 1e-5,
        "multi_query": True,
        "parallel_attn": True,
        "bias": False,
        "alibi": False,
        "new_decoder_architecture": False,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    },
    normalize=normalize,
    build_begin=build_begin,
    build_end=build_end,
)
