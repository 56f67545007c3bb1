"""Part specs: which sections of a model a node holds, written as `"b 0-12"`, `"12-24 e"`, `"f"`."""

from __future__ import annotations

import re
from dataclasses import dataclass

_RANGE = re.compile(r"(\d+)-(\d+)")


@dataclass(frozen=True)
class PartSpec:
    """Begin (embeddings), a sorted set of decoder layers, end (final norm and head).

    `full=True` (the `"f"` token) means everything; `resolve(num_layers)` turns it into an explicit spec.
    """

    begin: bool = False
    layers: tuple[int, ...] = ()
    end: bool = False
    full: bool = False

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ValueError(f"PartSpec layers must be non-negative ints, got {i!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"PartSpec layers must not repeat, got {layers}")
        object.__setattr__(self, "layers", tuple(sorted(layers)))
        if self.full and (self.begin or self.end or layers):
            raise ValueError("PartSpec(full=True) takes no begin/layers/end: 'f' means everything")

    @classmethod
    def parse(cls, text: str) -> PartSpec:
        """Parse `"b 0-12 e"`: tokens `b`, `e`, `f` and half-open ranges `i-j`, in that order."""
        if not isinstance(text, str):
            raise TypeError(f"a part spec is a string like 'b 0-12 e', got {type(text).__name__}")
        tokens = text.split()
        if not tokens:
            raise ValueError(f"empty part spec {text!r}: expected tokens like 'b 0-12 e' or 'f'")
        if "f" in tokens:
            if len(tokens) != 1:
                raise ValueError(f"part spec {text!r}: token 'f' (full model) must stand alone")
            return cls(full=True)
        begin = end = False
        layers: list[int] = []
        last_stop = -1
        for pos, token in enumerate(tokens):
            if token == "b":
                if pos != 0:
                    raise ValueError(f"part spec {text!r}: token 'b' must come first")
                begin = True
            elif token == "e":
                if pos != len(tokens) - 1:
                    raise ValueError(f"part spec {text!r}: token 'e' must come last")
                end = True
            elif m := _RANGE.fullmatch(token):
                start, stop = int(m.group(1)), int(m.group(2))
                if stop <= start:
                    raise ValueError(f"part spec {text!r}: range {token!r} is empty or reversed")
                if start < last_stop:
                    raise ValueError(
                        f"part spec {text!r}: range {token!r} overlaps or comes before the previous range"
                    )
                layers.extend(range(start, stop))
                last_stop = stop
            else:
                raise ValueError(
                    f"part spec {text!r}: cannot parse token {token!r}; expected 'b', 'e', 'f' or 'i-j'"
                )
        return cls(begin=begin, layers=tuple(layers), end=end)

    @classmethod
    def coerce(cls, spec: str | PartSpec) -> PartSpec:
        return spec if isinstance(spec, PartSpec) else cls.parse(spec)

    @property
    def ranges(self) -> tuple[range, ...]:
        """The layers as maximal half-open ranges of consecutive indices."""
        out: list[range] = []
        for i in self.layers:
            if out and out[-1].stop == i:
                out[-1] = range(out[-1].start, i + 1)
            else:
                out.append(range(i, i + 1))
        return tuple(out)

    def resolve(self, num_layers: int) -> PartSpec:
        """Expand `f` and check every layer exists in a model of `num_layers` layers."""
        if self.full:
            return PartSpec(begin=True, layers=tuple(range(num_layers)), end=True)
        for r in self.ranges:
            if r.stop > num_layers:
                raise ValueError(
                    f"part spec {str(self)!r}: token '{r.start}-{r.stop}' is outside the model, "
                    f"which has layers 0-{num_layers} (num_layers={num_layers})"
                )
        return self

    def __str__(self) -> str:
        if self.full:
            return "f"
        tokens = ["b"] if self.begin else []
        tokens += [f"{r.start}-{r.stop}" for r in self.ranges]
        tokens += ["e"] if self.end else []
        return " ".join(tokens)
