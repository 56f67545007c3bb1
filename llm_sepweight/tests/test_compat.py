"""The 0.10 API under its names."""

from __future__ import annotations

from pathlib import Path

import torch
from sw_helpers import tiny
from torch import nn

from llm_sepweight import Checkpoint, Part, PartStateDict, convert, dump, get_filenames, lazy_load, load


def _decider(key: str) -> list[str]:
    if key.startswith("h."):
        _, layer, *rest = key.split(".")
        return ["mid", layer, ".".join(rest)]
    return ["start", key] if key.startswith("wte") else ["end", key]


def test_dump_then_load_to_dict(tmp_path: Path) -> None:
    state = {"wte.weight": torch.randn(8, 4), "ln_f.weight": torch.randn(4)}
    for i in range(3):
        state[f"h.{i}.attn.weight"] = torch.randn(4, 4)
        state[f"h.{i}.mlp.bias"] = torch.randn(4)
    out = dump(_decider, state, tmp_path / "out")
    part = load(out, "b 0-2")
    assert isinstance(part, PartStateDict)
    flat = part.to_dict()
    assert sorted(flat) == [
        "begin.wte.weight",
        "mid.0.attn.weight",
        "mid.0.mlp.bias",
        "mid.1.attn.weight",
        "mid.1.mlp.bias",
    ]
    assert torch.equal(flat["mid.1.attn.weight"], state["h.1.attn.weight"])
    full = load(out, "f").to_dict()
    assert torch.equal(full["end.ln_f.weight"], state["ln_f.weight"]) and len(full) == len(state)


def test_get_filenames() -> None:
    assert get_filenames("b 0-2") == ["begin.safetensors", "mid.00000.safetensors", "mid.00001.safetensors"]
    assert get_filenames("5-6 e") == ["mid.00005.safetensors", "end.safetensors"]
    assert get_filenames("f", num_layers=1) == [
        "begin.safetensors",
        "mid.00000.safetensors",
        "end.safetensors",
    ]


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4, bias=False)
        self.mlp = nn.Module()
        self.mlp.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x) + self.mlp.bias


def test_lazy_load_into_a_0_10_part(tmp_path: Path) -> None:
    state = {
        f"h.{i}.{k}": torch.randn(*s)
        for i in range(3)
        for k, s in (("attn.weight", (4, 4)), ("mlp.bias", (4,)))
    }
    state["wte.weight"] = torch.randn(8, 4)
    out = dump(_decider, state, tmp_path / "out")
    part = Part(mid=_Layer, mid_range=range(1, 3))
    lazy_load(part, out, "1-3")
    assert torch.equal(part.mid["2"].attn.weight, state["h.2.attn.weight"])
    assert part(torch.ones(1, 4)).shape == (1, 4)


def test_load_reads_hf_directories_too(tmp_path: Path) -> None:
    src = tiny("llama")
    a = load(src, "b 0-1").to_dict()
    b = load(convert(src, tmp_path / "sw", progress=False), "b 0-1").to_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert all(name.endswith(".safetensors") for name in Checkpoint(src).files("b 0-1"))
