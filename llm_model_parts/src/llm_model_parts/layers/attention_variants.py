"""Attention for the families that differ from Llama's in how positions enter: no RoPE (learned positions),
interleaved or partial RoPE (GPT-J, Llama 4, DeepSeek), ALiBi (Falcon), chunked local attention and NoPE
layers with temperature tuning (Llama 4). Projections stay family-specific (`project` / `out`), the cache
and the masks are the shared ones of `Attention` and `step.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llm_model_parts.config import ModelConfig
from llm_model_parts.layers.alibi import alibi_mask
from llm_model_parts.layers.attention import KV, Attention, attend
from llm_model_parts.layers.positions import _allowed, key_positions
from llm_model_parts.layers.rope import apply_rope
from llm_model_parts.step import AttentionView, Step, write_cache


def deinterleave(x: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """(..., D): features (0, 1), (2, 3) ... of the first `rotary_dim` become halves [0, 2, 4 ... | 1, 3, 5 ...].

    Rotating interleaved pairs equals rotating halves of the de-interleaved vector; queries and keys are
    permuted alike, so their dot products (and the cache, which only ever meets them) need no undoing.
    """
    rot = x[..., :rotary_dim].unflatten(-1, (rotary_dim // 2, 2)).transpose(-1, -2).flatten(-2)
    if rotary_dim == x.shape[-1]:
        return rot
    return torch.cat((rot, x[..., rotary_dim:]), dim=-1)


class VariantAttention(Attention):
    """`Attention` with a choice of position scheme.

    rope: "half" (Llama's rotate-half), "interleaved" (pairs, GPT-J / Llama 4), or None (no rotary: learned
    positions, ALiBi or NoPE). `alibi`: add Falcon's ALiBi bias. `chunk_size`: Llama 4's chunked local
    attention (queries see keys of their own chunk only). `l2_qk_norm`: Llama 4's weightless L2 norm after
    RoPE. `temperature`: (attn_scale, floor_scale) of Llama 4's NoPE layers. `fp32_scores`: GPT-J computes
    q·k in fp32.
    """

    def __init__(
        self,
        config: ModelConfig,
        layer_index: int,
        *,
        rope: str | None = "half",
        alibi: bool = False,
        chunk_size: int | None = None,
        l2_qk_norm: float | None = None,
        temperature: tuple[float, float] | None = None,
        fp32_scores: bool = False,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: Callable[[int], nn.Module] | None = None,
        scaling: float | None = None,
    ) -> None:
        super().__init__(
            config, layer_index, qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=qk_norm, scaling=scaling
        )
        if rope not in ("half", "interleaved", None):
            raise ValueError(f"rope must be 'half', 'interleaved' or None, got {rope!r}")
        self.rope = rope
        self.alibi = alibi
        self.chunk_size = chunk_size
        self.l2_qk_norm = l2_qk_norm
        self.temperature = temperature
        self.fp32_scores = fp32_scores

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(x)

    def forward(self, x: torch.Tensor, step: Step, kv: KV | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        if step.packed and (self.alibi or self.chunk_size is not None):
            # packed prefix trees place tokens at non-contiguous positions; the position-derived masks
            # and biases here assume a plain sequence
            raise NotImplementedError("forward_packed does not support ALiBi or chunked attention layers")
        q, k, v = self.project(x)  # (B, T, H, D)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if self.rope is not None:
            cos, sin = step.rope[self.layer_type]
            if self.rope == "interleaved":
                q, k = deinterleave(q, cos.shape[-1]), deinterleave(k, cos.shape[-1])
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.l2_qk_norm is not None:
            q, k = _l2_norm(q, self.l2_qk_norm), _l2_norm(k, self.l2_qk_norm)
        if self.temperature is not None:
            attn_scale, floor_scale = self.temperature
            slots = step.slots(t, x.device).float()  # (R|1, T)
            scale = torch.log1p(torch.floor((slots + 1.0) / floor_scale)) * attn_scale + 1.0
            q = (q * scale[:, None, :, None]).to(q.dtype)
        view = self._view(step, t, x.device)
        k, v = write_cache(step, kv, k, v, view.key_start)
        out = self._attend(q, k, v, view, step)  # (B, H, T, D)
        return self.out(out.transpose(1, 2).reshape(b, t, -1))

    def _view(self, step: Step, t: int, device: torch.device) -> AttentionView:
        view = step.views[self.sliding_window]
        if self.chunk_size is None:
            return view
        key = f"chunked_{self.chunk_size}"
        if key not in step.extras:
            length = step.end - view.key_start
            allowed = _allowed(view, t, length, device)
            positions = key_positions(step, view.key_start)  # (B|1, L)
            chunk = positions // self.chunk_size
            same = chunk[:, None, -t:, None] == chunk[:, None, None, :]  # (B|1, 1, T, L)
            step.extras[key] = allowed & same
        return AttentionView(view.key_start, step.extras[key], False)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, view: AttentionView, step: Step
    ) -> torch.Tensor:
        if self.alibi:
            bias = alibi_mask(step, view, q.shape[2], self.num_heads, self.head_dim, q.dtype)
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, scale=self.scaling, enable_gqa=q.shape[1] != k.shape[1]
            )
        if self.fp32_scores and q.dtype != torch.float32:
            return attend(q.float(), k.float(), v.float(), view, self.scaling).to(q.dtype)
        return attend(q, k, v, view, self.scaling, self.softcap)


def _l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
