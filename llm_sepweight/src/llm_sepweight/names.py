"""Where each Hugging Face tensor name goes: begin, layer i, or end, and its name inside the part.

The one naming rule: a part's state dict uses HF's submodule names with the section prefix stripped,
`model.layers.3.self_attn.q_proj.weight` -> layer 3, `self_attn.q_proj.weight`;
`model.embed_tokens.weight` -> begin, `embed_tokens.weight`; `lm_head.weight` -> end, `lm_head.weight`.

A public API (documented in the README, used by llm_model_parts): the names in `__all__` keep their meaning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger(__name__)

__all__ = [
    "Location",
    "NameRule",
    "Section",
    "generic_rule",
    "locate",
    "num_layers_of",
    "rule_for",
    "split_names",
    "text_config",
    "tie_word_embeddings",
]

Section = Literal["begin", "mid", "end"]


@dataclass(frozen=True)
class Location:
    section: Section
    layer: int | None  # set for "mid" only
    name: str  # the name inside the part


@dataclass(frozen=True)
class NameRule:
    """Names of one architecture: the prefixes stripped, the layer container, which top-level names begin."""

    bases: tuple[str, ...]  # prefixes of the decoder body, most specific first ("model.", "transformer." ...)
    layers: str  # the layer container under a base ("layers", "h", "blocks")
    begin: tuple[str, ...]  # first name components under a base that go to begin
    end: tuple[str, ...]  # ... and to end; lm_head is always end
    embedding: str  # the begin tensor a tied head copies
    extras: tuple[str, ...] = ()  # prefixes kept whole in begin (a multimodal model's vision tower ...)
    lenient: bool = False  # guessed rules: any other name goes to end


_LLAMA = NameRule(("model.",), "layers", ("embed_tokens",), ("norm",), "embed_tokens.weight")
_GEMMA3 = NameRule(
    ("model.language_model.", "language_model.model.", "language_model.", "model."),
    "layers",
    ("embed_tokens",),
    ("norm",),
    "embed_tokens.weight",
    extras=("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector."),
)
_GPT2 = NameRule(("transformer.", ""), "h", ("wte", "wpe"), ("ln_f",), "wte.weight")
_FALCON = NameRule(("transformer.", ""), "h", ("word_embeddings",), ("ln_f",), "word_embeddings.weight")
_OPT = NameRule(
    ("model.decoder.", "decoder."),
    "layers",
    ("embed_tokens", "embed_positions", "project_in"),
    ("final_layer_norm", "project_out"),
    "embed_tokens.weight",
)

RULES: dict[str, NameRule] = {
    **dict.fromkeys(
        [
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "phi3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "mixtral",
            "qwen2_moe",
            "qwen3_moe",
            "deepseek_v3",
            "llama4_text",
            "olmo",
            "olmo2",
            "granite",
        ],
        _LLAMA,
    ),
    "gemma3": _GEMMA3,
    "falcon": _FALCON,
    "gpt2": _GPT2,
    "gptj": _GPT2,
    "opt": _OPT,
}

# Buffers some old checkpoints saved that HF itself ignores on load.
_IGNORED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attn\.masked_bias)$")
_GENERIC_LAYER = re.compile(r"^(?P<base>(?:[\w]+\.)*?)(?P<container>layers|h|blocks)\.\d+\.")
_HEADS = ("lm_head.", "language_model.lm_head.")


def generic_rule(names: Iterable[str]) -> NameRule:
    """A rule for an unknown architecture guessed from its layer names (`*.layers.N.*`, `*.h.N.*`, `*.blocks.N.*`)."""
    names = list(names)
    for name in names:
        if m := _GENERIC_LAYER.match(name):
            base, container = m.group("base"), m.group("container")
            tops = {n[len(base) :].split(".")[0] for n in names if n.startswith(base)} - {container}
            begin = tuple(sorted(t for t in tops if "emb" in t or t in ("wte", "wpe", "project_in")))
            end = tuple(sorted(tops - set(begin)))
            embedding = next(
                (f"{t}.weight" for t in begin if f"{base}{t}.weight" in names and "pos" not in t), ""
            )
            return NameRule((base,), container, begin, end, embedding, lenient=True)
    raise ValueError(
        "cannot find decoder layers in the tensor names (expected '*.layers.N.*', '*.h.N.*' or "
        f"'*.blocks.N.*'); first names: {names[:5]}"
    )


def rule_for(architecture: str | None, names: Iterable[str] = ()) -> NameRule:
    if architecture in RULES:
        return RULES[architecture]
    logger.info("architecture %r has no built-in name rule; guessing one from the tensor names", architecture)
    return generic_rule(names)


def locate(rule: NameRule, name: str) -> Location | None:
    """Where the HF tensor `name` goes; None for buffers HF ignores. Raises ValueError for an unknown name."""
    if _IGNORED.search(name):
        return None
    for head in _HEADS:
        if name.startswith(head):
            return Location("end", None, name[len(head) - len("lm_head.") :])
    for extra in rule.extras:
        if name.startswith(extra):
            return Location("begin", None, name.removeprefix("model."))
    for base in rule.bases:
        if not name.startswith(base):
            continue
        rest = name[len(base) :]
        first, _, tail = rest.partition(".")
        if first == rule.layers:
            index, _, local = tail.partition(".")
            if index.isdigit() and local:
                return Location("mid", int(index), local)
        if first in rule.begin:
            return Location("begin", None, rest)
        if first in rule.end:
            return Location("end", None, rest)
    if rule.lenient:
        base = next((b for b in rule.bases if name.startswith(b)), "")
        return Location("end", None, name[len(base) :])
    raise ValueError(
        f"tensor {name!r} matches no name rule (bases {list(rule.bases)}, layers {rule.layers!r}, "
        f"begin {list(rule.begin)}, end {list(rule.end)}); pass a decider to convert it"
    )


def split_names(
    architecture: str | None, names: Iterable[str], num_layers: int | None = None
) -> dict[str, Location]:
    """Locate every name; layers at or past `num_layers` (e.g. DeepSeek's MTP layers) are left out."""
    names = list(names)
    rule = rule_for(architecture, names)
    out: dict[str, Location] = {}
    for name in names:
        loc = locate(rule, name)
        if loc is None:
            continue
        if loc.layer is not None and num_layers is not None and loc.layer >= num_layers:
            logger.warning("skipping %s: layer %d is past num_hidden_layers=%d", name, loc.layer, num_layers)
            continue
        out[name] = loc
    return out


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The decoder's config: `text_config` of a multimodal wrapper, else the config itself."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) and "num_hidden_layers" in inner else config


def num_layers_of(config: dict[str, Any]) -> int | None:
    cfg = text_config(config)
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    return None


def tie_word_embeddings(config: dict[str, Any]) -> bool:
    """HF's default is to tie unless the config says otherwise (gemma3 keeps it on the outer config)."""
    for cfg in (config, text_config(config)):
        if "tie_word_embeddings" in cfg:
            return bool(cfg["tie_word_embeddings"])
    return True
