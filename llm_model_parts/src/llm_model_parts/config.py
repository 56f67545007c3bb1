"""One normalized model config built from a Hugging Face `config.json`, with HF's field names.

Reads both dialects of `config.json`: files written before transformers 5 (`rope_theta`, `rope_scaling`,
`rope_local_base_freq` ...) and files written by transformers 5 (`rope_parameters`, flat or nested by
layer type). Each family says its defaults and how to derive `layer_types` and the RoPE parameters per
layer type; everything ends up in `ModelConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")

# rope_type -> the fields it cannot do without (beyond rope_theta)
_ROPE_REQUIRED: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "longrope": ("short_factor", "long_factor"),
}


@dataclass(frozen=True)
class RopeParameters:
    """The `rope_parameters` of one layer type, with HF's key names."""

    rope_type: str = "default"
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str) -> RopeParameters:
        """`where` names the config field the dict came from, for error messages."""
        params = dict(raw)
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"config field {where}.rope_type: unknown RoPE type {rope_type!r}; "
                f"supported: {', '.join(ROPE_TYPES)}"
            )
        for name in _ROPE_REQUIRED[rope_type]:
            if params.get(name) is None:
                raise ValueError(f"config field {where}.{name} is required for rope_type {rope_type!r}")
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {k: v for k, v in params.items() if k in known and v is not None}
        for name in ("short_factor", "long_factor"):
            if name in kwargs:
                kwargs[name] = tuple(float(x) for x in kwargs[name])
        return cls(rope_type=rope_type, **kwargs)


@dataclass(frozen=True)
class ModelConfig:
    """What a part model needs from `config.json`. Field names are Hugging Face's."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    layer_types: tuple[str, ...]
    rope_parameters: dict[str, RopeParameters]  # layer type -> its RoPE
    sliding_window: int | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    pad_token_id: int | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> ModelConfig:
        """Build from a `config.json` dict (either dialect). Unsupported `model_type` raises ValueError."""
        from llm_model_parts.families import get_family

        raw = dict(config)
        if "text_config" in raw and "hidden_size" not in raw:
            raw = {
                **raw["text_config"],
                "model_type": raw["text_config"].get("model_type", raw.get("model_type")),
            }
        family = get_family(raw.get("model_type"))
        merged = {**family.defaults, **raw}
        if family.normalize is not None:
            merged = family.normalize(merged)
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if merged.get(name) is None:
                raise ValueError(f"config.json ({family.model_type}): field {name!r} is missing")
        if merged.get("num_key_value_heads") is None:
            merged["num_key_value_heads"] = merged["num_attention_heads"]
        if not merged.get("head_dim"):
            merged["head_dim"] = merged["hidden_size"] // merged["num_attention_heads"]
        merged["hidden_act"] = merged.get("hidden_activation") or merged.get("hidden_act") or "silu"
        n = int(merged["num_hidden_layers"])
        layer_types = tuple(family.layer_types(merged))
        if len(layer_types) != n:
            raise ValueError(f"config field layer_types has {len(layer_types)} entries, expected {n}")
        for t in layer_types:
            if t not in ("full_attention", "sliding_attention"):
                raise ValueError(
                    f"config field layer_types: unsupported attention type {t!r}; "
                    "supported: full_attention, sliding_attention"
                )
        if "sliding_attention" in layer_types and not merged.get("sliding_window"):
            raise ValueError("config field sliding_window must be set when layer_types has sliding_attention")
        rope = family.rope_parameters(merged)
        rope = {t: _with_original_length(p, merged) for t, p in rope.items()}
        missing = set(layer_types) - set(rope)
        if missing:
            raise ValueError(f"config field rope_parameters has no entry for layer types {sorted(missing)}")
        kq = merged["num_attention_heads"] % merged["num_key_value_heads"]
        if kq:
            raise ValueError(
                f"config: num_attention_heads={merged['num_attention_heads']} is not a multiple of "
                f"num_key_value_heads={merged['num_key_value_heads']}"
            )
        return cls(
            model_type=family.model_type,
            vocab_size=int(merged["vocab_size"]),
            hidden_size=int(merged["hidden_size"]),
            intermediate_size=int(merged["intermediate_size"]),
            num_hidden_layers=n,
            num_attention_heads=int(merged["num_attention_heads"]),
            num_key_value_heads=int(merged["num_key_value_heads"]),
            head_dim=int(merged["head_dim"]),
            max_position_embeddings=int(merged.get("max_position_embeddings") or 2048),
            rms_norm_eps=float(merged.get("rms_norm_eps") or 1e-6),
            hidden_act=str(merged["hidden_act"]),
            tie_word_embeddings=bool(merged.get("tie_word_embeddings", False)),
            attention_bias=bool(merged.get("attention_bias", False)),
            mlp_bias=bool(merged.get("mlp_bias", False)),
            layer_types=layer_types,
            rope_parameters=rope,
            sliding_window=merged.get("sliding_window") if "sliding_attention" in layer_types else None,
            query_pre_attn_scalar=merged.get("query_pre_attn_scalar"),
            attn_logit_softcapping=merged.get("attn_logit_softcapping"),
            final_logit_softcapping=merged.get("final_logit_softcapping"),
            pad_token_id=merged.get("pad_token_id"),
            bos_token_id=merged.get("bos_token_id"),
            eos_token_id=merged.get("eos_token_id"),
            raw=raw,
        )


def standard_rope(config: Mapping[str, Any], where_nested: str | None = None) -> RopeParameters:
    """One RoPE for every layer: transformers-5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params: dict[str, Any] = {}
    where = "rope_parameters"
    if isinstance(config.get("rope_scaling"), Mapping):
        params.update(config["rope_scaling"])
        where = "rope_scaling"
    if isinstance(config.get("rope_parameters"), Mapping):
        params.update(config["rope_parameters"])
        where = "rope_parameters"
    if params.get("rope_theta") is None:
        params["rope_theta"] = config.get("rope_theta") or 10000.0
    if config.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    return RopeParameters.from_dict(params, where)


def _with_original_length(rope: RopeParameters, config: Mapping[str, Any]) -> RopeParameters:
    """HF fills `original_max_position_embeddings` for the scalings that use it: a top-level field
    (Phi-3 keeps one there) wins, else the one in the RoPE dict, else `max_position_embeddings`."""
    if rope.rope_type not in ("llama3", "yarn", "longrope"):
        return rope
    top = config.get("original_max_position_embeddings")
    value = top or rope.original_max_position_embeddings or config.get("max_position_embeddings")
    if value is None:
        raise ValueError("config field rope_parameters.original_max_position_embeddings is required")
    return replace(rope, original_max_position_embeddings=int(value))


def single_rope_for_all(config: Mapping[str, Any]) -> dict[str, RopeParameters]:
    rope = standard_rope(config)
    return {"full_attention": rope, "sliding_attention": rope}


def all_full(config: Mapping[str, Any]) -> list[str]:
    return ["full_attention"] * int(config["num_hidden_layers"])


def explicit_or(config: Mapping[str, Any], default: list[str]) -> list[str]:
    """`layer_types` from the config when present, else `default`."""
    explicit = config.get("layer_types")
    return list(explicit) if explicit else default
