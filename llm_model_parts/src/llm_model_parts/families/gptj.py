"""GPT-J: attention and MLP in parallel on one LayerNorm (`x + attn(ln_1(x)) + mlp(ln_1(x))`), rotary on
the first `rotary_dim` features of each head in interleaved pairs, a biased `lm_head`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from llm_model_parts.config import HIDDEN_ACTS, ModelConfig
from llm_model_parts.config_checks import choice, epsilon, positive
from llm_model_parts.families.gpt2 import GPT_ALIASES, derive_gpt
from llm_model_parts.family import Family
from llm_model_parts.layers.attention import KV
from llm_model_parts.layers.attention_variants import VariantAttention
from llm_model_parts.layers.ends import Begin, End
from llm_model_parts.layers.linear import Linear
from llm_model_parts.layers.mlp import activation
from llm_model_parts.step import Step


@dataclass(frozen=True)
class GPTJConfig(ModelConfig, model_type="gptj"):
    hf_defaults: ClassVar[dict[str, Any]] = {
        "vocab_size": 50400,
        "max_position_embeddings": 2048,
        "hidden_size": 4096,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": False,
    }
    hf_aliases: ClassVar[dict[str, str]] = GPT_ALIASES

    rotary_dim: int | None = positive(64)
    n_inner: int | None = positive(None)
    activation_function: str = choice(HIDDEN_ACTS, "gelu_new")
    layer_norm_epsilon: float = epsilon(1e-5)

    @classmethod
    def derive(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Rotary on the first `rotary_dim` features of each head (all of them when unset)."""
        out = derive_gpt(config)
        heads = out["num_attention_heads"]
        if out["hidden_size"] % heads:
            raise ValueError(
                f"config field num_attention_heads={heads} does not divide hidden_size={out['hidden_size']}"
            )
        head_dim = out["hidden_size"] // heads
        out["partial_rotary_factor"] = (out["rotary_dim"] or head_dim) / head_dim
        return out


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
    def __init__(self, config: GPTJConfig, i: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPTJAttention(config, i)
        self.mlp = GPTJMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, step: Step, kv: KV | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        return self.attn(h, step, kv) + self.mlp(h) + x


def build_begin(config: GPTJConfig) -> nn.Module:
    return Begin(config.vocab_size, config.hidden_size, embed_name="wte")


def build_end(config: GPTJConfig) -> nn.Module:
    norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
    return End(norm, config.hidden_size, config.vocab_size, norm_name="ln_f", head_bias=True)


FAMILY = Family(
    model_type="gptj",
    config_class=GPTJConfig,
    build_layer=GPTJBlock,
    build_begin=build_begin,
    build_end=build_end,
)
