"""The API of llm_sepweight 0.10, kept working on top of the new format.

- `dump(decider, state_dict, out_path)`: the decider maps a key to `["start", name]`,
  `["mid", "<layer>", name]` or `["end", name]`, as in 0.10; the directory written is the new format.
- `load(path, spec).to_dict()`: `begin.*`, `mid.<i>.*`, `end.*`, as in 0.10 (and `load` reads 0.10
  directories of `.pth` files too, with `weights_only=True`).
- `get_filenames(spec)`: the files a spec needs, now `.safetensors`.
- `lazy_load(module, path, spec)`: load into a module laid out like 0.10's `Part` (begin / mid / end).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm_sepweight import format as fmt
from llm_sepweight.checkpoint import Checkpoint
from llm_sepweight.convert import convert
from llm_sepweight.spec import PartSpec


def dump(
    decider: Callable[[str], Sequence[str] | None],
    state_dict: Mapping[str, torch.Tensor],
    out_path: str | Path,
    *,
    config: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `state_dict` as a sepweight directory, sections chosen by the 0.10 `decider`."""
    return convert(state_dict, out_path, decider=decider, config=config, dtype=dtype, progress=False)


def get_filenames(spec: str | PartSpec, num_layers: int | None = None) -> list[str]:
    """The files of a sepweight directory that `spec` needs (`"f"` needs `num_layers`)."""
    part = PartSpec.coerce(spec)
    if part.full and num_layers is None:
        raise ValueError("get_filenames('f') needs num_layers= (or use Checkpoint(path).files('f'))")
    return fmt.file_names(part.resolve(num_layers) if num_layers is not None else part)


def lazy_load(module: nn.Module, path: str | Path, spec: str | PartSpec) -> None:
    """Load `spec` section by section into `module` (submodules `begin`, `mid.<i>`, `end`; strict=False)."""
    ckpt = Checkpoint(path)
    part = PartSpec.coerce(spec).resolve(ckpt.num_layers)
    if part.begin:
        module.load_state_dict(_prefixed("begin.", ckpt.load("b").begin or {}), strict=False)
    for i in part.layers:
        module.load_state_dict(_prefixed(f"mid.{i}.", ckpt.layer_state_dict(i)), strict=False)
    if part.end:
        module.load_state_dict(_prefixed("end.", ckpt.load("e").end or {}), strict=False)


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


class Part(nn.Module):
    """0.10's container: optional `begin`, `mid` (a ModuleDict by layer index) and `end`, run in order."""

    def __init__(
        self,
        begin: Callable[[], nn.Module] | None = None,
        mid: Callable[[], nn.Module] | None = None,
        end: Callable[[], nn.Module] | None = None,
        mid_range: range | None = None,
    ) -> None:
        super().__init__()
        self.begin = begin() if begin is not None else None
        if mid_range is not None and not isinstance(mid_range, range):
            raise TypeError(f"mid_range must be a range, got {type(mid_range).__name__}")
        self.mid = (
            nn.ModuleDict({str(i): mid() for i in mid_range}) if mid is not None and mid_range else None
        )
        self.end = end() if end is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.begin is not None:
            x = self.begin(x)
        if self.mid is not None:
            for layer in self.mid.values():
                x = layer(x)
        if self.end is not None:
            x = self.end(x)
        return x
