"""GPT-2: learned absolute positions (`wpe`), fused `c_attn`, LayerNorm, GELU MLP, tied head.

HF stores GPT-2's projections as `Conv1D`: weight (in, out), the transpose of `nn.Linear`'s, so they load
unchanged and run as `x @ weight + bias`.
"""

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
from llm_model_parts.layers.mlp import activation
from llm_model_parts.step import Step

# HF's attribute_map: GPT-2 and GPT-J spell the common fields their own way
GPT_ALIASES: dict[str, str] = {
    "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_positions": "max_position_embeddings",
}


def derive_gpt(config: dict[str, Any]) -> dict[str, Any]:
    """GPT-2 / GPT-J: the MLP is `n_inner` wide (4 * n_embd when unset), one KV head per query head."""
    return {
        **config,
        "intermediate_size": config["n_inner"] or 4 * config["hidden_size"],
        "num_key_value_heads": config["num_attention_heads"],
        "hidden_act": config["activation_function"],
        "rms_norm_eps": config["layer_norm_epsilon"],
        "head_dim": None,
    }


@dataclass(frozen=True)
class GPT2Config(ModelConfig, model_type="gpt2"):
    hf_defaults: ClassVar[dict[str, Any]] = {
        "vocab_size": 50257,
        "max_position_embeddings": 1024,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
    }
    hf_aliases: ClassVar[dict[str, str]] = GPT_ALIASES

    n_inner: int | None = positive(None)
    activation_function: str = choice(HIDDEN_ACTS, "gelu_new")
    layer_norm_epsilon: float = epsilon(1e-5)
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False

    @classmethod
    def derive(cls, config: dict[str, Any]) -> dict[str, Any]:
        return derive_gpt(config)


class Conv1D(nn.Module):
    """HF's `Conv1D`: a linear layer whose weight is stored (in_features, out_features)."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class GPT2Attention(VariantAttention):
    def __init__(self, config: GPT2Config, i: int) -> None:
        scaling = config.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
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
    def __init__(self, config: GPT2Config, i: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(h, eps=eps)
        self.attn = GPT2Attention(config, i)
        self.ln_2 = nn.LayerNorm(h, eps=eps)
        self.mlp = GPT2MLP(h, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, step: Step, kv: KV | None = None) -> torch.Tensor:
        h = x + self.attn(self.ln_1(x), step, kv)
        return h + self.mlp(self.ln_2(h))


def build_begin(config: GPT2Config) -> nn.Module:
    return Begin(
        config.vocab_size,
        config.hidden_size,
        embed_name="wte",
        positions_name="wpe",
        num_positions=config.max_position_embeddings,
    )


def build_end(config: GPT2Config) -> nn.Module:
    norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
    return End(norm, config.hidden_size, config.vocab_size, norm_name="ln_f")


FAMILY = Family(
    model_type="gpt2",
    config_class=GPT2Config,
    build_layer=GPT2Block,
    build_begin=build_begin,
    build_end=build_end,
)
