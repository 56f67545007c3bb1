"""Rotary position embeddings with every scaling HF uses for these families.

`inv_freq` follows transformers' `modeling_rope_utils` formula for formula (default, linear, dynamic NTK,
YaRN, llama3, longrope), so the angles match to the last bit. `dynamic` and `longrope` depend on the
longest position in the call; they are computed with tensor ops (no host sync) each call.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llm_model_parts.config import RopeParameters


def _base_inv_freq(base: float | torch.Tensor, dim: int, device: torch.device | str | None) -> torch.Tensor:
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (base**exponent)


def _yarn(rope: RopeParameters, dim: int, device: torch.device | str | None) -> tuple[torch.Tensor, float]:
    base, factor = rope.rope_theta, float(rope.factor or 1.0)
    original = int(rope.original_max_position_embeddings or 0)

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as HF: avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


def _llama3(rope: RopeParameters, dim: int, device: torch.device | str | None) -> torch.Tensor:
    inv_freq = _base_inv_freq(rope.rope_theta, dim, device)
    factor = float(rope.factor or 1.0)
    low_freq_factor, high_freq_factor = (
        float(rope.low_freq_factor or 1.0),
        float(rope.high_freq_factor or 4.0),
    )
    old_context_len = int(rope.original_max_position_embeddings or 0)
    low_freq_wavelen, high_freq_wavelen = (
        old_context_len / low_freq_factor,
        old_context_len / high_freq_factor,
    )
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. `sin` comes back with its first half negated, so that
    `apply_rope` needs one roll instead of HF's `rotate_half` (same products, same sums)."""

    def __init__(
        self,
        rope: RopeParameters,
        head_dim: int,
        max_position_embeddings: int,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.rope_type = rope.rope_type
        self.dim = int(head_dim * rope.partial_rotary_factor)
        self.max_position_embeddings = max_position_embeddings
        self.attention_scaling = 1.0
        self.dynamic_factor = 0.0
        self.base = float(rope.rope_theta)
        self.original_max_position_embeddings = int(rope.original_max_position_embeddings or 0)
        dim = self.dim
        long_inv_freq = None
        if rope.rope_type in ("default", "dynamic"):
            inv_freq = _base_inv_freq(self.base, dim, device)
            self.dynamic_factor = float(rope.factor or 0.0) if rope.rope_type == "dynamic" else 0.0
        elif rope.rope_type == "linear":
            inv_freq = _base_inv_freq(self.base, dim, device) / float(rope.factor or 1.0)
        elif rope.rope_type == "yarn":
            inv_freq, self.attention_scaling = _yarn(rope, dim, device)
        elif rope.rope_type == "llama3":
            inv_freq = _llama3(rope, dim, device)
        elif rope.rope_type == "longrope":
            inv_freq, long_inv_freq = self._longrope(rope, device)
        else:  # config.py rejects unknown types first; this guards direct construction
            raise ValueError(f"unknown rope_type {rope.rope_type!r}")
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.register_buffer(
            "long_inv_freq", long_inv_freq.float() if long_inv_freq is not None else None, persistent=False
        )

    def _longrope(
        self, rope: RopeParameters, device: torch.device | str | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        original = self.original_max_position_embeddings
        for name, values in (("short_factor", rope.short_factor), ("long_factor", rope.long_factor)):
            if values is None or len(values) != self.dim // 2:
                raise ValueError(
                    f"config field rope_parameters.{name} must have {self.dim // 2} entries (rotary dim / 2), "
                    f"got {None if values is None else len(values)}"
                )
        factor = rope.factor if rope.factor is not None else self.max_position_embeddings / original
        attention_factor = rope.attention_factor
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        self.attention_scaling = float(attention_factor)
        shape = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        short = 1.0 / (torch.tensor(rope.short_factor, dtype=torch.float32, device=device) * self.base**shape)
        long = 1.0 / (torch.tensor(rope.long_factor, dtype=torch.float32, device=device) * self.base**shape)
        return short, long

    inv_freq: torch.Tensor
    long_inv_freq: torch.Tensor | None

    def _inv_freq_for(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.long_inv_freq is not None:
            seq_len = position_ids.max() + 1
            return torch.where(
                seq_len > self.original_max_position_embeddings, self.long_inv_freq, self.inv_freq
            )
        if self.dynamic_factor:
            # NTK base grows with the longest position in this call, as transformers' dynamic update does.
            max_pos, factor = self.max_position_embeddings, self.dynamic_factor
            seq_len = torch.clamp(position_ids.max() + 1, min=max_pos)
            base = self.base * ((factor * seq_len / max_pos) - (factor - 1)) ** (self.dim / (self.dim - 2))
            grown = _base_inv_freq(base, self.dim, position_ids.device)
            return torch.where(seq_len > max_pos, grown, self.inv_freq)
        return self.inv_freq

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B|1, T) -> cos, signed sin, each (B|1, 1, T, rotary_dim) in `dtype`."""
        inv_freq = self._inv_freq_for(position_ids)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, dim / 2)
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        cos = torch.cat((cos, cos), dim=-1).to(dtype)
        sin = torch.cat((-sin, sin), dim=-1).to(dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, head_dim); rotates the first `cos.shape[-1]` features (all of them unless partial)."""
    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        return torch.addcmul(x * cos, x.roll(dim // 2, dims=-1), sin)
    rot, rest = x[..., :dim], x[..., dim:]
    return torch.cat((torch.addcmul(rot * cos, rot.roll(dim // 2, dims=-1), sin), rest), dim=-1)
