"""Multi-head latent attention (DeepSeek-V2/V3) with its compressed KV cache.

The cache holds, per token, one latent `[kv_a_layernorm(c) | rope(k_rot)]` of width kv_lora_rank +
qk_rope_head_dim (576 for DeepSeek-V3, against 2 * 128 heads * 192 for plain MHA), shared by all heads.
Prefill expands the latents into per-head keys and values with `kv_b_proj`; decode absorbs `kv_b_proj` into
the query and the output instead, attending straight over the cached latents (one "KV head"), so a decode
step never re-expands the cache.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llm_model_parts.config import RopeParameters
from llm_model_parts.layers.attention import KV, attend
from llm_model_parts.layers.attention_variants import deinterleave
from llm_model_parts.layers.linear import Linear
from llm_model_parts.layers.norm import RMSNorm
from llm_model_parts.layers.rope import apply_rope
from llm_model_parts.step import Step, write_cache


class MLAConfig(Protocol):
    """The fields of a DeepSeek config that MLA reads (`families.deepseek_v3.DeepseekV3Config` has them)."""

    @property
    def hidden_size(self) -> int: ...
    @property
    def num_attention_heads(self) -> int: ...
    @property
    def attention_bias(self) -> bool: ...
    @property
    def layer_types(self) -> tuple[str, ...]: ...
    @property
    def rope_parameters(self) -> dict[str, RopeParameters]: ...
    @property
    def q_lora_rank(self) -> int | None: ...
    @property
    def kv_lora_rank(self) -> int: ...
    @property
    def qk_nope_head_dim(self) -> int: ...
    @property
    def qk_rope_head_dim(self) -> int: ...
    @property
    def v_head_dim(self) -> int: ...
    @property
    def rope_interleave(self) -> bool: ...


def _mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class MLAttention(nn.Module):
    """HF's `self_attn` of DeepSeek-V3: `q_a_proj`, `q_a_layernorm`, `q_b_proj` (or `q_proj` without a query
    LoRA), `kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`, `o_proj`."""

    def __init__(self, config: MLAConfig, layer_index: int) -> None:
        super().__init__()
        h, bias = config.hidden_size, config.attention_bias
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.interleaved = config.rope_interleave
        self.layer_type = config.layer_types[layer_index]
        self.sliding_window = None
        qk_head = self.nope + self.rope_dim
        if self.q_lora_rank is None:
            self.q_proj = Linear(h, self.num_heads * qk_head, bias=False)
        else:
            self.q_a_proj = Linear(h, int(self.q_lora_rank), bias=bias)
            self.q_a_layernorm = RMSNorm(int(self.q_lora_rank), eps=1e-6)
            self.q_b_proj = Linear(int(self.q_lora_rank), self.num_heads * qk_head, bias=False)
        self.kv_a_proj_with_mqa = Linear(h, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = Linear(self.kv_lora_rank, self.num_heads * (self.nope + self.v_head_dim), bias=False)
        self.o_proj = Linear(self.num_heads * self.v_head_dim, h, bias=bias)
        self.scaling = qk_head**-0.5
        rope = config.rope_parameters[self.layer_type]
        if rope.rope_type != "default" and rope.mscale_all_dim:
            self.scaling *= _mscale(float(rope.factor or 1.0), float(rope.mscale_all_dim)) ** 2

    def cache_shape(self) -> tuple[int, int, int]:
        """One shared latent per token as the key; no separate values."""
        return 1, self.kv_lora_rank + self.rope_dim, 0

    def forward(self, x: torch.Tensor, step: Step, kv: KV | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.num_heads, -1).transpose(1, 2)  # (B, H, T, nope + rope)
        q_pass, q_rot = q.split([self.nope, self.rope_dim], dim=-1)
        c, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c = self.kv_a_layernorm(c)
        k_rot = k_rot.view(b, 1, t, self.rope_dim)
        cos, sin = step.rope[self.layer_type]
        if self.interleaved:
            q_rot, k_rot = deinterleave(q_rot, self.rope_dim), deinterleave(k_rot, self.rope_dim)
        q_rot, k_rot = apply_rope(q_rot, cos, sin), apply_rope(k_rot, cos, sin)
        latent = torch.cat((c.view(b, 1, t, self.kv_lora_rank), k_rot), dim=-1)  # (B, 1, T, lora + rope)
        view = step.views[None]
        latents, _ = write_cache(step, kv, latent, latent[..., :0], view.key_start)
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_head_dim, self.kv_lora_rank)
        w_k, w_v = w[:, : self.nope], w[:, self.nope :]  # (H, nope, lora), (H, v, lora)
        if t == 1:
            # absorbed: q_pass . (W_k c) = (W_k^T q_pass) . c, and W_v is applied after attention
            q_lat = torch.einsum("bhtn,hnl->bhtl", q_pass, w_k)
            # the heads become the query rows of a single latent "KV head"; the (B|1, 1, 1, L) mask broadcasts
            query = torch.cat((q_lat, q_rot), dim=-1).transpose(1, 2)  # (B, 1, H, lora + rope)
            out_lat = F.scaled_dot_product_attention(
                query, latents, latents[..., : self.kv_lora_rank], attn_mask=view.mask, scale=self.scaling
            )  # (B, 1, H, lora)
            out = torch.einsum("bthl,hvl->bhtv", out_lat, w_v)
        else:
            length = latents.shape[2]
            kv_full = self.kv_b_proj(latents[:, 0, :, : self.kv_lora_rank]).view(
                b, length, self.num_heads, -1
            )
            k_nope, v = kv_full.transpose(1, 2).split([self.nope, self.v_head_dim], dim=-1)
            k_pe = latents[..., self.kv_lora_rank :].expand(b, self.num_heads, length, self.rope_dim)
            k = torch.cat((k_nope, k_pe), dim=-1)
            out = attend(torch.cat((q_pass, q_rot), dim=-1), k, v, view, self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.v_head_dim))
