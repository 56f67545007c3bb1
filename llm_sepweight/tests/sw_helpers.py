"""Expected part state dicts taken from the module tree of a model transformers loaded (not from our rules)."""

from __future__ import annotations

import re
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


def expected_from_files(
    path: Path, model: nn.Module, num_layers: int
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Like `expected_parts`, but the tensors as the checkpoint files hold them (read by `safetensors`).

    The section of a name comes from where transformers' module tree puts the decoder layers. MoE families
    differ: transformers 5 fuses per-expert checkpoint tensors into one parameter when it loads them, while
    checkpoints (and sepweight directories) keep the per-expert tensors.
    """
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    layers_path = next(
        n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers
    )
    body = layers_path.rpartition(".")[0] + "." if "." in layers_path else ""
    outer: dict[str, torch.Tensor] = {}
    layers: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
    for name, t in tensors.items():
        if name.startswith(layers_path + "."):
            index, _, rest = name[len(layers_path) + 1 :].partition(".")
            layers[int(index)][rest] = t
        else:
            outer[name.removeprefix(body)] = t
    if "lm_head.weight" not in outer:
        weight = model.get_input_embeddings().weight
        outer["lm_head.weight"] = next(
            t for t in outer.values() if t.shape == weight.shape and torch.equal(t, weight)
        )
    # the tensors transformers loaded unchanged must be the same, and its fused experts the stacked per-expert ones
    module_outer, module_layers = expected_parts(model, num_layers)
    for want, got in [(module_outer, outer), *zip(module_layers, layers, strict=True)]:
        for k in set(want) & set(got):
            assert torch.equal(want[k], got[k]), k
        _check_fused_experts(want, got)
    return outer, layers


_EXPERT = re.compile(r"(?:.*\.)?experts\.(\d+)\.(gate_proj|w1|up_proj|w3|down_proj|w2)\.weight")


def _check_fused_experts(module: dict[str, torch.Tensor], files: dict[str, torch.Tensor]) -> None:
    """transformers 5 holds experts as gate_up_proj (E, 2I, H) = [gate; up] and down_proj (E, H, I)."""
    experts: dict[str, dict[int, torch.Tensor]] = {"gate": {}, "up": {}, "down": {}}
    for name, t in files.items():
        if m := _EXPERT.fullmatch(name):
            kind = {"w1": "gate", "w3": "up", "w2": "down"}.get(m.group(2), m.group(2).removesuffix("_proj"))
            experts[kind][int(m.group(1))] = t
    fused = {k: v for k, v in module.items() if k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    if not experts["gate"] or not fused:
        return
    n = len(experts["gate"])
    gate_up = torch.stack([torch.cat([experts["gate"][e], experts["up"][e]]) for e in range(n)])
    down = torch.stack([experts["down"][e] for e in range(n)])
    for name, t in fused.items():
        assert torch.equal(t, gate_up if name.endswith("gate_up_proj") else down), name
