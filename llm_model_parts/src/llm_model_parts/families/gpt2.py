"""GPT-2: learned absolute positions (`wpe`), fused `c_attn`, LayerNorm, GELU MLP, tied head.

HF stores GPT-2's projections as `Conv1D`: weight (in, out), the transpose of `nn.Linear`'s, so they load
unchanged and run as `x @ weight + bias`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llm_model_parts.config import ModelConfig
from llm_model_parts.families import Family
from llm_model_parts.layers.attention import KV
from llm_model_parts.layers.attention_variants import VariantAttention
from llm_model_parts.layers.ends import Begin, End
from llm_model_parts.layers.mlp import activation
from llm_model_parts.step import Step


class Conv1D(nn.Module):
    """HF's `Conv1D`: a linear layer whose weight is stored (in_features, out_features)."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class GPT2Attention(VariantAttention):
    def __init__(self, config: ModelConfig, i: int) -> None:
        raw = config.raw
        scaling = config.head_dim**-0.5 if raw.get("scale_attn_weights", True) else 1.0
        if raw.get("scale_attn_by_inverse_layer_idx", False):
            scaling /= float(i + 1)
        super().__init__(config, i, rope=None, scaling=scaling)

    def _make_projections(self, config: ModelConfig, qkv_bias: bool, o_bias: bool) -> None:
        self.c_attn = Conv1D(3 * config.hidden_size, config.hidden_size)
        self.c_proj = Conv1D(config.hidden_size, config.hidden_size)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).view(b, t, 3, self.num_heads, self.head_dim).unbind(2)
        return q, k, v

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(x)


class GPT2MLP(nn.Module):
    def __init__(self, hidden: int, inner: int, act: str) -> None:
        super().__init__()
        self.c_fc = Conv1D(inner, hidden)
        self.c_proj = Conv1D(hidden, inner)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, i: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.ln_1 = nn.LayerNorm(h, eps=eps)
        self.attn = GPT2Attention(config, i)
        self.ln_2 = nn.LayerNorm(h, eps=eps)
        self.mlp = GPT2MLP(h, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, step: Step, kv: KV | None = None) -> torch.Tensor:
        h = x + self.attn(self.ln_1(x), step, kv)
        return h + self.mlp(self.ln_2(h))


def normalize(config: dict[str, Any]) -> dict[str, Any]:
    """GPT-2's names (`n_embd`, `n_layer`, `n_head`, `n_inner`, `n_positions`) -> the common ones."""
    out = dict(config)
    for ours, theirs in (
        ("hidden_size", "n_embd"),
        ("num_hidden_layers", "n_layer"),
        ("num_attention_heads", "n_head"),
        ("max_position_embeddings", "n_positions"),
        ("rms_norm_eps", "layer_norm_epsilon"),
        ("hidden_act", "activation_function"),
    ):
        if out.get(theirs) is not None:
            out[ours] = out[theirs]
    if out.get("hidden_size") is not None:
        out["intermediate_size"] = out.get("n_inner") or 4 * int(out["hidden_size"])
    out["num_key_value_heads"] = out.get("num_attention_heads")
    out.pop("hidden_activation", None)
    return out


def build_begin(config: ModelConfig) -> nn.Module:
    return Begin(
        config.vocab_size,
        config.hidden_size,
        embed_name="wte",
        positions_name="wpe",
        num_positions=config.max_position_embeddings,
    )


def build_end(config: ModelConfig) -> nn.Module:
    norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
    return End(norm, config.hidden_size, config.vocab_size, norm_name="ln_f")


FAMILY = Family(
    model_type="gpt2",
    build_layer=GPT2Block,
    defaults={
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_positions": 1024,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
        "tie_word_embeddings": True,
    },
    normalize=normalize,
    build_begin=build_begin,
    build_end=build_end,
)
