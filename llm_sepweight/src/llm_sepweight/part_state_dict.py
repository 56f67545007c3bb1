"""The loaded weights of a part: begin, layers by index, end."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PartStateDict:
    """`begin` and `end` are None when the spec leaves them out; `mid` maps a layer index to its state dict."""

    begin: dict[str, torch.Tensor] | None = None
    mid: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    end: dict[str, torch.Tensor] | None = None

    def to_dict(self) -> dict[str, torch.Tensor]:
        """One flat state dict: `begin.*`, `mid.<i>.*`, `end.*` (the layout of llm_sepweight 0.10)."""
        out: dict[str, torch.Tensor] = {}
        for k, v in (self.begin or {}).items():
            out[f"begin.{k}"] = v
        for i in sorted(self.mid):
            for k, v in self.mid[i].items():
                out[f"mid.{i}.{k}"] = v
        for k, v in (self.end or {}).items():
            out[f"end.{k}"] = v
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_dict().values())
