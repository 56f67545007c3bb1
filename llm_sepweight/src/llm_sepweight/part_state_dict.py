"""The loaded weights of a part: begin, layers by index, end (and 0.10's `PartSpec`, imported from here)."""

from __future__ import annotations

from typing import Any

import torch

from llm_sepweight.spec import PartSpec

__all__ = ["PartSpec", "PartStateDict"]


class PartStateDict:
    """`begin` and `end` are None when the spec leaves them out; `mid` maps a layer index to its state dict.

    `main_range` (0.10): the layers `to_dict()` puts under `mid.<i>.*`. When not given it is the first run of
    consecutive loaded layers (the first range of the spec, or every layer of `"f"`).
    """

    def __init__(
        self,
        begin: dict[str, torch.Tensor] | None = None,
        mid: dict[int, dict[str, torch.Tensor]] | None = None,
        main_range: range | None = None,
        end: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.begin = begin
        self.mid: dict[int, dict[str, torch.Tensor]] = {} if mid is None else mid
        self._main_range = main_range
        self.end = end

    @property
    def main_range(self) -> range | None:
        if self._main_range is not None:
            return self._main_range
        return _first_run(self.mid)

    @main_range.setter
    def main_range(self, value: range | None) -> None:
        self._main_range = value

    def to_dict(self, target_range: range | None = None) -> dict[str, torch.Tensor]:
        """One flat state dict: `begin.*`, `mid.<i>.*`, `end.*` (the layout of llm_sepweight 0.10).

        `target_range` (0.10): take these loaded layers and name them by `main_range`'s indices, so one module
        built for `main_range` can load either range of a spec like `"0-5 30-35"`.
        """
        main = self.main_range
        out: dict[str, torch.Tensor] = {}
        for k, v in (self.begin or {}).items():
            out[f"begin.{k}"] = v
        if main is not None:
            target = main if target_range is None else target_range
            self._check_target(target, main)
            for layer, slot in zip(target, main, strict=False):
                for k, v in self.mid[layer].items():
                    out[f"mid.{slot}.{k}"] = v
        for k, v in (self.end or {}).items():
            out[f"end.{k}"] = v
        return out

    def _check_target(self, target: Any, main: range) -> None:
        if not isinstance(target, range):
            raise TypeError(f"to_dict(target_range): expected a range, got {type(target).__name__}")
        if len(target) > len(main):
            raise ValueError(
                f"to_dict({target!r}): {len(target)} layers do not fit the {len(main)} of main_range {main!r}"
            )
        missing = [i for i in target if i not in self.mid]
        if missing:
            raise ValueError(
                f"to_dict({target!r}): layers {missing[:5]} were not loaded (loaded: {_runs(self.mid)})"
            )

    @property
    def nbytes(self) -> int:
        sections = [self.begin or {}, *self.mid.values(), self.end or {}]
        return sum(t.numel() * t.element_size() for s in sections for t in s.values())

    def __repr__(self) -> str:
        return (
            f"PartStateDict(begin={_count(self.begin)}, mid=layers {_runs(self.mid)}, "
            f"main_range={self.main_range!r}, end={_count(self.end)})"
        )


def _first_run(mid: dict[int, Any]) -> range | None:
    if not mid:
        return None
    start = min(mid)
    stop = start
    while stop in mid:
        stop += 1
    return range(start, stop)


def _runs(mid: dict[int, Any]) -> str:
    out: list[str] = []
    for i in sorted(mid):
        if out and out[-1].endswith(f"-{i}"):
            out[-1] = out[-1].rsplit("-", 1)[0] + f"-{i + 1}"
        else:
            out.append(f"{i}-{i + 1}")
    return " ".join(out) or "none"


def _count(section: dict[str, torch.Tensor] | None) -> str:
    return "None" if section is None else f"{len(section)} tensors"
