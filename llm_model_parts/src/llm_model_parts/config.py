"""One normalized model config built from a Hugging Face `config.json`, with HF's field names.

Reads both dialects of `config.json`: files written before transformers 5 (`rope_theta`, `rope_scaling`,
`rope_local_base_freq` ...) and files written by transformers 5 (`rope_parameters`, flat or nested by
layer type). Each family says its defaults and how to derive `layer_types` and the RoPE parameters per
layer type; everything ends up in the family's subclass of `ModelConfig` (`families/<family>.py`), typed,
with the defaults its transformers config class applies, and checked (config_checks.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any, ClassVar, get_type_hints

from llm_model_parts.config_checks import check_field, choice, epsilon, positive, typed_value

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


# layers.mlp.ACTIVATIONS' names (a test keeps the two equal; config.py imports no layer)
HIDDEN_ACTS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")

_CONFIG_TYPES: dict[str, type[ModelConfig]] = {}

# The optional fields declared on ModelConfig, as a family without them in transformers has them
_OPTIONAL_FIELDS: dict[str, Any] = {
    "attention_bias": False,
    "mlp_bias": False,
    "query_pre_attn_scalar": None,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
}


def absent_except(*present: str) -> dict[str, Any]:
    """`hf_absent` for a family whose transformers class has the optional fields `present`."""
    return {k: v for k, v in _OPTIONAL_FIELDS.items() if k not in present}


@dataclass(frozen=True)
class ModelConfig:
    """What every family's part model reads from `config.json`. Field names are Hugging Face's.

    Each family subclasses it (`LlamaConfig`, `GPT2Config` ...; `class XConfig(ModelConfig, model_type="x")`
    registers it) with its own typed fields, and with the defaults of its transformers config class:
    `hf_defaults` for the fields declared here, dataclass defaults for its own, `hf_aliases` for other names
    of a field (GPT-2's `n_embd`), `hf_absent` for the fields declared here that the class lacks, `derive`
    for what the class's `__post_init__` computes. `raw` keeps the `config.json` dict as given (a VLM's
    `text_config`) for callers; nothing in this package reads it.
    """

    hf_defaults: ClassVar[Mapping[str, Any]] = {}
    hf_aliases: ClassVar[Mapping[str, str]] = {}
    # Fields declared here that the family's transformers class does not have: its model ignores them in a
    # config.json, so do we (a stray `final_logit_softcapping` must not cap a Llama's logits).
    hf_absent: ClassVar[Mapping[str, Any]] = _OPTIONAL_FIELDS

    model_type: str
    vocab_size: int = positive()
    hidden_size: int = positive()
    intermediate_size: int = positive()
    num_hidden_layers: int = positive()
    num_attention_heads: int = positive()
    num_key_value_heads: int = positive()
    head_dim: int = positive()
    max_position_embeddings: int = positive()
    rms_norm_eps: float = epsilon()
    hidden_act: str = choice(HIDDEN_ACTS)
    tie_word_embeddings: bool = False
    layer_types: tuple[str, ...] = ()
    rope_parameters: dict[str, RopeParameters] = field(default_factory=dict)  # layer type -> its RoPE
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # 0 or null: no window (checked where a layer slides)
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    pad_token_id: int | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    image_token_id: int | None = None  # where `inputs_embeds` without a mask go (a VLM's text model)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __init_subclass__(cls, model_type: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if model_type is not None:
            _CONFIG_TYPES[model_type] = cls

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> ModelConfig:
        """Build from a `config.json` dict (either dialect): the family's config class, its defaults applied.
        Unsupported `model_type` or an invalid value raises ValueError naming it."""
        raw = _text_config(config)
        target = config_class(raw.get("model_type"))
        if not issubclass(target, cls):
            raise ValueError(f"config.json model_type {raw.get('model_type')!r} is not a {cls.__name__}")
        return target._build(raw)

    @classmethod
    def derive(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The family's `__post_init__`: fields computed from others (typed values in, values out)."""
        return config

    @classmethod
    def hf_layer_types(cls, config: Mapping[str, Any]) -> list[str]:
        return explicit_or(config, all_full(config))

    @classmethod
    def hf_rope_parameters(cls, config: Mapping[str, Any]) -> dict[str, RopeParameters]:
        return single_rope_for_all(config)

    @classmethod
    def _build(cls, raw: dict[str, Any]) -> ModelConfig:
        values = {**_field_defaults(cls), **cls.hf_defaults, **raw}
        for alias, name in cls.hf_aliases.items():
            if alias in raw and name not in raw:
                values[name] = raw[alias]
        values.update(cls.hf_absent)
        values["model_type"] = raw["model_type"]
        hints = get_type_hints(cls)
        for f in _fields_family_first(cls):
            # null = unset: derive may fill it (HF's `head_dim: null`); the second pass checks what is left
            if values.get(f.name) is not None and f.name not in ("layer_types", "rope_parameters", "raw"):
                values[f.name] = typed_value(f.name, values[f.name], hints[f.name])
                check_field(f, values[f.name])
        values = _derive_common(cls, cls.derive(values))
        kwargs: dict[str, Any] = {}
        for f in _fields_family_first(cls):
            if f.name == "raw":
                continue
            if f.name not in values:
                raise ValueError(f"config.json ({raw['model_type']}): field {f.name!r} is missing")
            kwargs[f.name] = typed_value(f.name, values[f.name], hints[f.name])
            check_field(f, kwargs[f.name])
        return cls(**kwargs, raw=raw)


def config_class(model_type: object) -> type[ModelConfig]:
    """The config class registered for `model_type` (the families register theirs on import)."""
    if not isinstance(model_type, str) or model_type not in _CONFIG_TYPES:
        raise ValueError(
            f"config.json model_type {model_type!r} is not supported by llm_model_parts; "
            f"supported: {', '.join(sorted(_CONFIG_TYPES))}"
        )
    return _CONFIG_TYPES[model_type]


def _text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A VLM's `text_config` (with the outer `image_token_id`), or the config itself."""
    raw = dict(config)
    if "text_config" in raw and "hidden_size" not in raw:
        outer = raw
        raw = {
            **raw["text_config"],
            "model_type": raw["text_config"].get("model_type", raw.get("model_type")),
        }
        for name in ("image_token_id", "image_token_index"):
            if outer.get(name) is not None and name not in raw:
                raw[name] = outer[name]
    return raw


def _field_defaults(cls: type[ModelConfig]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
    return out


def _fields_family_first(cls: type[ModelConfig]) -> list[Field[Any]]:
    """A family's own fields first, so a bad `activation_function` is named before the `hidden_act` it sets."""
    common = len(fields(ModelConfig))
    all_fields = list(fields(cls))
    return all_fields[common:] + all_fields[:common]


def _derive_common(cls: type[ModelConfig], values: dict[str, Any]) -> dict[str, Any]:
    """What every family derives alike: KV heads, head_dim, layer types, RoPE per layer type."""
    heads = values.get("num_attention_heads")
    if values.get("num_key_value_heads") is None:
        values["num_key_value_heads"] = heads
    if not values.get("head_dim") and heads:
        hidden = int(values["hidden_size"])
        if hidden % heads:
            raise ValueError(
                f"config field num_attention_heads={heads} does not divide hidden_size={hidden} "
                "(head_dim is derived from them)"
            )
        values["head_dim"] = hidden // heads
    kv = values["num_key_value_heads"]
    if heads and kv and heads % kv:
        raise ValueError(
            f"config field num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}"
        )
    if values.get("image_token_id") is None:
        values["image_token_id"] = values.get("image_token_index")
    n = int(values["num_hidden_layers"])
    layer_types = tuple(typed_value("layer_types", cls.hf_layer_types(values), tuple[str, ...]))
    if len(layer_types) != n:
        raise ValueError(f"config field layer_types has {len(layer_types)} entries, expected {n}")
    for t in layer_types:
        if t not in ("full_attention", "sliding_attention"):
            raise ValueError(
                f"config field layer_types: unsupported attention type {t!r}; "
                "supported: full_attention, sliding_attention"
            )
    window = values.get("sliding_window")
    if "sliding_attention" in layer_types and (not window or window < 0):
        raise ValueError(
            f"config field sliding_window must be a positive integer when layer_types has sliding_attention, "
            f"got {window!r}"
        )
    if "sliding_attention" not in layer_types:
        values["sliding_window"] = None
    rope = {t: _with_original_length(p, values) for t, p in cls.hf_rope_parameters(values).items()}
    missing = set(layer_types) - set(rope)
    if missing:
        raise ValueError(f"config field rope_parameters has no entry for layer types {sorted(missing)}")
    return {**values, "layer_types": layer_types, "rope_parameters": rope}


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
