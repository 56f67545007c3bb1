"""Self-attention through `F.scaled_dot_product_attention`: MHA / GQA / MQA, optional q/k/v/o biases,
optional QK-norm, sliding windows, logit softcapping, and a preallocated KV cache written in place."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llm_model_parts.config import ModelConfig
from llm_model_parts.layers.fused import fuse, fused_sizes
from llm_model_parts.layers.linear import Linear
from llm_model_parts.layers.rope import apply_rope
from llm_model_parts.step import AttentionView, Step, write_cache

KV = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    """HF's `self_attn`: `q_proj`, `k_proj`, `v_proj` (stored fused as one `qkv_proj`, see layers.fused;
    Phi-3's checkpoints fuse them already), `o_proj` (and `q_norm`, `k_norm`).

    The layer holds no state but its parameters: the cache buffers come in with each call.
    """

    qkv_proj: nn.Module

    def __init__(
        self,
        config: ModelConfig,
        layer_index: int,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: Callable[[int], nn.Module] | None = None,
        scaling: float | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.layer_type = config.layer_types[layer_index]
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None
        self.scaling = scaling if scaling is not None else self.head_dim**-0.5
        self.softcap = softcap  # tanh cap on attention logits (Gemma 2 style); None for most families
        self._make_projections(config, qkv_bias, o_bias)
        fuse(self, "qkv_proj", ("q_proj", "k_proj", "v_proj"))  # families that build them apart
        self.q_norm = qk_norm(self.head_dim) if qk_norm else None
        self.k_norm = qk_norm(self.head_dim) if qk_norm else None

    def _make_projections(self, config: ModelConfig, qkv_bias: bool, o_bias: bool) -> None:
        hidden, q_out, kv_out = config.hidden_size, self.num_heads * self.head_dim, self.kv_width
        self.q_proj = Linear(hidden, q_out, bias=qkv_bias)
        self.k_proj = Linear(hidden, kv_out, bias=qkv_bias)
        self.v_proj = Linear(hidden, kv_out, bias=qkv_bias)
        self.o_proj = Linear(q_out, hidden, bias=o_bias)

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def _qkv_sizes(self) -> tuple[int, ...]:
        if hasattr(self, "_qkv_proj_sizes"):
            return fused_sizes(self, "qkv_proj")
        return (self.num_heads * self.head_dim, self.kv_width, self.kv_width)  # a checkpoint's own qkv_proj

    def cache_shape(self) -> tuple[int, int]:
        """(key/value heads, head_dim) of this layer's cache entries."""
        return self.num_key_value_heads, self.head_dim

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, hidden) -> q (B, T, H, D), k and v (B, T, H_kv, D)."""
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self._qkv_sizes(), dim=-1)
        shape_kv = (b, t, self.num_key_value_heads, self.head_dim)
        return q.view(b, t, self.num_heads, self.head_dim), k.view(shape_kv), v.view(shape_kv)

    def forward(self, x: torch.Tensor, step: Step, kv: KV | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if t == 1:  # decode: (B, 1, H, D) and (B, H, 1, D) have the same layout, a view suffices
            q, k, v = (z.view(b, z.shape[2], 1, self.head_dim) for z in (q, k, v))
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = step.rope[self.layer_type]
        q = apply_rope(q, cos, sin)  # (B, H, T, D)
        k = apply_rope(k, cos, sin)  # (B, H_kv, T, D)
        view = step.views[self.sliding_window]
        k, v = write_cache(step, kv, k, v, view.key_start)
        out = attend(q, k, v, view, self.scaling, self.softcap)  # (B, H, T, D)
        out = out.view(b, 1, -1) if t == 1 else out.transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(out)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    view: AttentionView,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, H_kv, L, D) -> (B, H, T, D)."""
    b, h, t, d = q.shape
    groups = h // k.shape[1]
    if softcap is not None:
        return _softcapped(q, k, v, view, scaling, softcap)
    if t == 1 and groups > 1:
        # Decode: the query heads that share a KV head become rows of one query block, so K/V are read
        # once and never repeated; the (B, 1, 1, L) mask broadcasts over those rows.
        out = F.scaled_dot_product_attention(
            q.reshape(b, k.shape[1], groups, d), k, v, attn_mask=view.mask, scale=scaling
        )
        return out.reshape(b, h, 1, d)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=view.mask, is_causal=view.is_causal, scale=scaling, enable_gqa=groups > 1
    )


def _softcapped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, view: AttentionView, scaling: float, softcap: float
) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    mask = view.mask
    if mask is None and view.is_causal:
        t, length = scores.shape[-2:]
        mask = torch.ones(t, length, dtype=torch.bool, device=q.device).tril(length - t)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)
