"""Weights into a Part built on `meta`: checked by HF name and shape against the config, assigned
(`load_state_dict(assign=True)`, so nothing is allocated twice), tied, or random for tests.

`load_part` reads a checkpoint a section at a time (begin, each layer, end), copies it into the part's own
memory (joining q/k/v and gate/up into their fused parameters is that copy for those) and closes each
file's memory map before the next, so the peak stays at the part plus one section.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llm_model_parts.layers.norm import GemmaRMSNorm, RMSNorm

if TYPE_CHECKING:
    from llm_model_parts.part import Part

logger = logging.getLogger(__name__)


def expected_tensors(part: nn.Module) -> dict[str, torch.Size]:
    """The part's tensors by HF name (fused projections split) and their shapes."""
    return {name: t.shape for name, t in part.state_dict(keep_vars=True).items()}


def assign(part: Part, weights: Mapping[str, torch.Tensor], device: Any, dtype: torch.dtype | None) -> None:
    """Check `weights` (some or all of the part's tensors, HF names) against the config and assign them."""
    expected = expected_tensors(part)
    for name, t in weights.items():
        if name in expected and t.shape != expected[name]:
            raise ValueError(
                f"{describe(part, name)} has shape {tuple(t.shape)}, expected {tuple(expected[name])} from config.json"
            )
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise KeyError(
            f"{describe(part, unexpected[0])} is not a tensor of a {part.config.model_type} part built from "
            f"this config.json ({len(unexpected)} unexpected in all); the config may not match the weights"
        )
    converted = {
        name: t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
        for name, t in weights.items()
    }
    part.load_state_dict(converted, strict=False, assign=True)
    tie(part)


def check_complete(part: Part, provided: set[str]) -> None:
    """Every tensor of the part was given (`provided`: the HF names loaded) or is tied."""
    state = part.state_dict(keep_vars=True)
    for name, t in state.items():
        if name not in provided and name != "lm_head.weight":
            raise missing(part, name, t.shape)
    for name, t in state.items():
        if t.device.type == "meta":
            raise missing(part, name, t.shape)


def missing(part: Part, name: str, shape: torch.Size) -> KeyError:
    return KeyError(
        f"{describe(part, name)} is missing from the weights for part {str(part.spec)!r} "
        f"({part.config.model_type}); expected shape {tuple(shape)}"
    )


def load_weights(
    part: Part, weights: Mapping[str, torch.Tensor], device: Any, dtype: torch.dtype | None
) -> None:
    expected = expected_tensors(part)
    for name, shape in expected.items():
        if name not in weights:
            raise missing(part, name, shape)
    assign(part, weights, device, dtype)
    logger.info("loaded part %r of %s (%d tensors)", str(part.spec), part.config.model_type, len(weights))


def init_random(part: Part, device: Any, dtype: torch.dtype) -> None:
    weights: dict[str, torch.Tensor] = {}
    for module_name, module in part.named_modules():
        for name, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if isinstance(module, GemmaRMSNorm):
                t = torch.zeros(p.shape, device=device, dtype=dtype)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)) and name == "weight":
                t = torch.ones(p.shape, device=device, dtype=dtype)
            elif name == "bias":
                t = torch.zeros(p.shape, device=device, dtype=dtype)
            else:
                t = torch.randn(p.shape, device=device, dtype=dtype) * 0.02
            weights[full] = t
    # by parameter name: the fused projections are filled whole
    for full, t in weights.items():
        owner_name, _, leaf = full.rpartition(".")
        owner = part.get_submodule(owner_name) if owner_name else part
        setattr(owner, leaf, nn.Parameter(t, requires_grad=False))
    tie(part)


def tie(part: Part) -> None:
    begin, end = part.begin_section, part.end_section
    if part.config.tie_word_embeddings and begin is not None and end is not None:
        end.lm_head.weight = begin.input_embeddings.weight


def describe(part: Part, name: str) -> str:
    pieces = name.split(".")
    if pieces[0] == "layers" and len(pieces) > 2 and pieces[1].isdigit():
        return f"tensor {'.'.join(pieces[2:])!r} of layer {part.layer_indices[int(pieces[1])]}"
    begin = part.begin_section
    section = "begin" if begin is not None and pieces[0] in dict(begin.named_children()) else "end"
    return f"{section} tensor {name!r}"


def own_memory(part: Part, loaded: Any) -> None:
    """Copy the tensors that still share memory with a checkpoint's memory map (those that needed no cast
    and no joining), so that the map can be closed."""
    mapped = {t.data_ptr() for t in loaded if t.device.type == "cpu"}
    for module in part.modules():
        for leaf, p in list(module._parameters.items()):
            if p is not None and p.device.type == "cpu" and p.data_ptr() in mapped:
                module._parameters[leaf] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    tie(part)
