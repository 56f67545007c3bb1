"""Map the weights a user brings to a part's own tensor names (`embed_tokens.weight`,
`layers.<local index>.self_attn.q_proj.weight`, `norm.weight`, `lm_head.weight`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from llm_model_parts.config import ModelConfig
from llm_sepweight import PartSpec
from llm_sepweight.names import NameRule, rule_for, split_names

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old Llama checkpoints saved this buffer


def to_part_names(weights: Any, spec: PartSpec, config: ModelConfig) -> dict[str, torch.Tensor]:
    """`weights`: a PartStateDict-like object (`.begin`, `.mid`, `.end`) or a flat HF-named state dict."""
    local = {layer: j for j, layer in enumerate(spec.layers)}
    out: dict[str, torch.Tensor] = {}
    if hasattr(weights, "mid"):
        if spec.begin:
            out.update(_section(weights.begin, "begin"))
        for layer, j in local.items():
            if layer not in weights.mid:
                raise KeyError(f"the weights have no tensors for layer {layer} (part {str(spec)!r})")
            out.update({f"layers.{j}.{k}": v for k, v in weights.mid[layer].items() if not _ignored(k)})
        if spec.end:
            out.update(_section(weights.end, "end"))
        return out
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"state_dict must be a PartStateDict or a mapping of tensors, got {type(weights).__name__}"
        )
    return _by_name_rules(weights, spec, config)


def _section(tensors: Mapping[str, torch.Tensor] | None, name: str) -> dict[str, torch.Tensor]:
    if tensors is None:
        raise KeyError(f"the weights have no {name} section, but the part spec asks for it")
    return section_tensors(tensors)


def section_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One section's tensors (begin, a layer, end) without the buffers old checkpoints saved."""
    return {k: v for k, v in tensors.items() if not _ignored(k)}


def _ignored(name: str) -> bool:
    return name.endswith(_IGNORED_SUFFIXES)


def _by_name_rules(
    weights: Mapping[str, torch.Tensor], spec: PartSpec, config: ModelConfig
) -> dict[str, torch.Tensor]:
    """A flat HF state dict (`model.layers.3.mlp.up_proj.weight`, `transformer.h.3.attn.c_attn.weight` ...)
    mapped by llm_sepweight's per-architecture name rules; the rule's body prefix (`model.`) is optional."""
    rule = rule_for(config.model_type, weights)
    named = {_with_base(rule, name): tensor for name, tensor in weights.items()}
    local = {layer: j for j, layer in enumerate(spec.layers)}
    out: dict[str, torch.Tensor] = {}
    begin: dict[str, torch.Tensor] = {}
    for name, loc in split_names(config.model_type, named, config.num_hidden_layers).items():
        if loc.section == "mid" and loc.layer in local:
            out[f"layers.{local[loc.layer]}.{loc.name}"] = named[name]
        elif loc.section == "begin":
            begin[loc.name] = named[name]
        elif loc.section == "end" and spec.end:
            out[loc.name] = named[name]
    if spec.begin:
        out.update(begin)
    if spec.end and "lm_head.weight" not in out and config.tie_word_embeddings and rule.embedding in begin:
        out["lm_head.weight"] = begin[rule.embedding]
    return out


def _with_base(rule: NameRule, name: str) -> str:
    """`layers.0.mlp.up_proj.weight` -> `model.layers.0.mlp.up_proj.weight` (names without the body prefix)."""
    if name.startswith(("lm_head.", *rule.bases)) or not rule.bases:
        return name
    return rule.bases[-1] + name
