"""GPT-J: attention and MLP in parallel on one LayerNorm (`x + attn(ln_1(x)) + mlp(ln_1(x))`), rotary on
the first `rotary_dim` features of each head in interleaved pairs, a biased `lm_head`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llm_model_parts.config import ModelConfig
from llm_model_parts.families import Family
from llm_model_parts.families.gpt2 import normalize as gpt2_normalize
from llm_model_parts.layers.attention import KV
from llm_model_parts.layers.attention_variants import VariantAttention
from llm_model_parts.layers.ends import Begin, End
from llm_model_parts.layers.linear import Linear
from llm_model_parts.layers.mlp import activation
from llm_model_parts.step import Step


class GPTJAttention(VariantAttention):
    def __init__(self, config: ModelConfig, i: int) -> None:
        super().__init__(config, i, rope="interleaved", fp32_scores=True)

    def _make_projections(self, config: ModelConfig, qkv_bias: bool, o_bias: bool) -> None:
        h = config.hidden_size
        self.q_proj = Linear(h, h, bias=False)
        self.k_proj = Linear(h, h, bias=False)
        self.v_proj = Linear(h, h, bias=False)
        self.out_proj = Linear(h, h, bias=False)

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(x)


class GPTJMLP(nn.Module):
    def __init__(self, hidden: int, inner: int, act: str) -> None:
        super().__init__()
        self.fc_in = Linear(hidden, inner)
        self.fc_out = Linear(inner, hidden)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class GPTJBlock(nn.Module):
    def __init__(self, config: ModelConfig, i: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = GPTJAttention(config, i)
        self.mlp = GPTJMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, step: Step, kv: KV | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        return self.attn(h, step, kv) + self.mlp(h) + x


def normalize(config: dict[str, Any]) -> dict[str, Any]:
    out = gpt2_normalize(config)
    head_dim = int(out["hidden_size"]) // int(out["num_attention_heads"])
    rotary_dim = out.get("rotary_dim") or head_dim
    out["partial_rotary_factor"] = rotary_dim / head_dim
    return out


def build_begin(config: ModelConfig) -> nn.Module:
    return Begin(config.vocab_size, config.hidden_size, embed_name="wte")


def build_end(config: ModelConfig) -> nn.Module:
    norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
    return End(norm, config.hidden_size, config.vocab_size, norm_name="ln_f", head_bias=True)


FAMILY = Family(
    model_type="gptj",
    build_layer=GPTJBlock,
    defaults={
        "n_embd": 4096,
        "n_layer": 28,
        "n_head": 16,
        "n_positions": 2048,
        "rotary_dim": 64,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
        "tie_word_embeddings": False,
    },
    normalize=normalize,
    build_begin=build_begin,
    build_end=build_end,
)
