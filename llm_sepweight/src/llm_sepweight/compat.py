"""The API of llm_sepweight 0.10, kept working on top of the new format.

- `dump(decider, state_dict, out_path)`: the decider maps a key to `["start", name]`,
  `["mid", "<layer>", name]` or `["end", name]`, as in 0.10; the directory written is the new format.
- `load(path, spec).to_dict()`: `begin.*`, `mid.<i>.*`, `end.*`, as in 0.10 (and `load` reads 0.10
  directories of `.pth` files too, with `weights_only=True`).
- `get_filenames(spec)`: the files a spec needs, now `.safetensors`.
- `lazy_load(module, path, spec)`: load section by section into a plain module (each section's own names)
  or into a 0.10 `Part` (begin / mid / end).
- `is_cpu_memory_less_than_gpu(device)`; the modules `pth_conversion`, `safetensors_conversion`, and
  `PartSpec` importable from `part_state_dict`, as in 0.10.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm_sepweight import format as fmt
from llm_sepweight.checkpoint import Checkpoint
from llm_sepweight.convert import convert
from llm_sepweight.spec import PartSpec
from llm_sepweight.utils import is_cpu_memory_less_than_gpu

__all__ = ["Part", "dump", "get_filenames", "is_cpu_memory_less_than_gpu", "lazy_load"]

logger = logging.getLogger(__name__)


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
    """Load `spec` into `module` one section at a time (strict=False), as 0.10 did.

    A plain module receives each section's own names (`"0-1"` into the module of one layer, `"b"` into an
    embedding); a 0.10 `Part` receives them under `begin.*`, `mid.<i>.*` and `end.*`. A section none of whose
    tensors the module has raises `ValueError` (0.10 silently loaded nothing).
    """
    ckpt = Checkpoint(path)
    part = PartSpec.coerce(spec).resolve(ckpt.num_layers)
    as_part = isinstance(module, Part)
    sections: list[tuple[str, str, Callable[[], dict[str, torch.Tensor]]]] = []
    if part.begin:
        sections.append(("begin", "begin.", lambda: ckpt.load("b").begin or {}))
    for i in part.layers:
        sections.append((f"layer {i}", f"mid.{i}.", lambda i=i: ckpt.layer_state_dict(i)))  # type: ignore[misc]
    if part.end:
        sections.append(("end", "end.", lambda: ckpt.load("e").end or {}))
    for what, prefix, read in sections:
        state = read()
        if as_part:
            state = _prefixed(prefix, state)
        logger.info("lazy_load: %s of %s into %s", what, ckpt.path, type(module).__name__)
        result = module.load_state_dict(state, strict=False)
        if state and len(result.unexpected_keys) == len(state):
            raise ValueError(
                f"{ckpt.path}: lazy_load({spec!r}): none of the {len(state)} tensors of {what} "
                f"({sorted(state)[:3]}) is a parameter of the {type(module).__name__} given "
                f"(it has {list(module.state_dict())[:3]})"
            )
        del state


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
