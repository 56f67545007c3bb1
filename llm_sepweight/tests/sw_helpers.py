"""Expected part state dicts taken from the module tree of a model transformers loaded (not from our rules)."""

from __future__ import annotations

from pathlib import Path

import fixtures
import torch
from tiny_configs import TINY_CONFIGS
from torch import nn

TINY_NAMES = sorted(TINY_CONFIGS)


def tiny(name: str) -> Path:
    return fixtures.tiny_checkpoint(name)


def expected_parts(
    model: nn.Module, num_layers: int
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(begin and end together, [layer state dicts]) of an HF causal LM, with HF's names inside each part."""
    body, layers = None, None
    for _, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == num_layers and layers is None:
                body, layers, container = module, child, child_name
    assert body is not None and layers is not None
    outer = {k: v for k, v in body.state_dict().items() if not k.startswith(f"{container}.")}
    head = model.get_output_embeddings()
    if head is not None:
        outer.update({f"lm_head.{k}": v for k, v in head.state_dict().items()})
    return outer, [layer.state_dict() for layer in layers]


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: names differ: {sorted(set(got) ^ set(want))}"
    for k in want:
        assert got[k].shape == want[k].shape, f"{what}: {k} shape {got[k].shape} != {want[k].shape}"
        assert torch.equal(got[k].to(want[k].dtype), want[k]), f"{what}: {k} differs"
