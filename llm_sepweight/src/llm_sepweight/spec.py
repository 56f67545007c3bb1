"""Part specs: which sections of a model a node holds, written as `"b 0-12"`, `"12-24 e"`, `"f"`.

A spec keeps its layers as half-open ranges and expands them only when asked (`layers`), so a spec like
`"0-100000000"` costs nothing until `resolve(num_layers)` rejects it. Layer indices are bounded by
`MAX_LAYERS` before any range is built. The 0.10 API (`from_string`, `mid`, `is_full`, and the
constructor `PartSpec(begin, mid, end, is_full)`) works on the same class.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

_RANGE = re.compile(r"(\d{1,12})-(\d{1,12})")
MAX_LAYERS = 1_000_000  # no model has this many decoder layers; larger indices are rejected, never expanded


class PartSpec:
    """Begin (embeddings), a sorted set of decoder layers, end (final norm and head).

    `full=True` (the `"f"` token) means everything (`begin` and `end` are then True); `resolve(num_layers)`
    turns it into an explicit spec. `layers` accepts ints or `range`s; `mid=` (a list of ranges) and
    `is_full=` are the 0.10 names of `layers` and `full`.
    """

    __slots__ = ("_begin", "_end", "_full", "_ranges", "_written")
    _begin: bool
    _end: bool
    _full: bool
    _ranges: tuple[range, ...]
    _written: tuple[range, ...]

    def __init__(
        self,
        begin: bool | None = None,
        layers: Iterable[int | range] = (),
        end: bool | None = None,
        full: bool | None = None,
        *,
        mid: Iterable[range] | None = None,
        is_full: bool | None = None,
    ) -> None:
        if mid is not None:
            if layers:
                raise TypeError("PartSpec: give layers= or mid= (its 0.10 name), not both")
            layers = mid
        if is_full is not None:
            if full is not None and bool(full) != bool(is_full):
                raise TypeError("PartSpec: give full= or is_full= (its 0.10 name), not both")
            full = is_full
        written = _as_ranges(layers)
        ranges = _merged(written)
        if full:
            if begin is False or end is False or ranges:
                raise ValueError(
                    "PartSpec(full=True) takes no layers and no begin/end=False: 'f' means everything"
                )
            begin = end = True
        _set(self, _begin=bool(begin), _end=bool(end), _full=bool(full), _ranges=ranges, _written=written)

    # --- the fields ------------------------------------------------------------------------------------

    @property
    def begin(self) -> bool:
        return self._begin

    @property
    def end(self) -> bool:
        return self._end

    @property
    def full(self) -> bool:
        return self._full

    @property
    def is_full(self) -> bool:
        """0.10's name of `full`."""
        return self.full

    @property
    def layers(self) -> tuple[int, ...]:
        """The decoder layers, sorted (expanded from the ranges on each call: resolve a spec before this)."""
        return tuple(i for r in self._ranges for i in r)

    @property
    def ranges(self) -> tuple[range, ...]:
        """The layers as maximal half-open ranges of consecutive indices."""
        return self._ranges

    @property
    def mid(self) -> list[range]:
        """0.10's field: the layer ranges as written (`"0-5 5-10"` is two ranges here, one in `ranges`)."""
        return list(self._written)

    # --- parsing ---------------------------------------------------------------------------------------

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
        ranges: list[range] = []
        for pos, token in enumerate(tokens):
            if token == "b":
                if pos != 0:
                    raise ValueError(f"part spec {text!r}: token 'b' must come first")
                begin = True
            elif token == "e":
                if pos != len(tokens) - 1:
                    raise ValueError(f"part spec {text!r}: token 'e' must come last")
                end = True
            else:
                ranges.append(_parse_range(text, token, ranges[-1].stop if ranges else 0))
        return cls(begin=begin, layers=ranges, end=end)

    @classmethod
    def from_string(cls, raw: str) -> PartSpec:
        """0.10's name of `parse`."""
        return cls.parse(raw)

    @classmethod
    def coerce(cls, spec: str | PartSpec) -> PartSpec:
        return spec if isinstance(spec, PartSpec) else cls.parse(spec)

    def resolve(self, num_layers: int) -> PartSpec:
        """Expand `f` and check every layer exists in a model of `num_layers` layers (before expanding)."""
        if (
            isinstance(num_layers, bool)
            or not isinstance(num_layers, int)
            or not 0 <= num_layers <= MAX_LAYERS
        ):
            raise ValueError(f"num_layers must be an int in 0..{MAX_LAYERS}, got {num_layers!r}")
        if self.full:
            return PartSpec(begin=True, layers=[range(num_layers)] if num_layers else (), end=True)
        for r in self._ranges:
            if r.stop > num_layers:
                raise ValueError(
                    f"part spec {str(self)!r}: token '{r.start}-{r.stop}' is outside the model, "
                    f"which has layers 0-{num_layers} (num_layers={num_layers})"
                )
        return self

    # --- value semantics -------------------------------------------------------------------------------

    def _key(self) -> tuple[Any, ...]:
        return (self.begin, self._ranges, self.end, self.full)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PartSpec) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"PartSpec is immutable (cannot set {name!r})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (PartSpec, (self.begin, self._written, self.end, self.full))

    def __repr__(self) -> str:
        return f"PartSpec.parse({str(self)!r})" if (self.begin or self.end or self._ranges) else "PartSpec()"

    def __str__(self) -> str:
        if self.full:
            return "f"
        tokens = ["b"] if self.begin else []
        tokens += [f"{r.start}-{r.stop}" for r in self._ranges]
        tokens += ["e"] if self.end else []
        return " ".join(tokens)


def _set(spec: PartSpec, **values: Any) -> None:
    for name, value in values.items():
        object.__setattr__(spec, name, value)


def _parse_range(text: str, token: str, previous_stop: int) -> range:
    m = _RANGE.fullmatch(token)
    if m is None:
        raise ValueError(f"part spec {text!r}: cannot parse token {token!r}; expected 'b', 'e', 'f' or 'i-j'")
    start, stop = int(m.group(1)), int(m.group(2))
    if stop > MAX_LAYERS:
        raise ValueError(f"part spec {text!r}: range {token!r} goes past the {MAX_LAYERS}-layer limit")
    if stop <= start:
        raise ValueError(f"part spec {text!r}: range {token!r} is empty or reversed")
    if start < previous_stop:
        raise ValueError(f"part spec {text!r}: range {token!r} overlaps or comes before the previous range")
    return range(start, stop)


def _as_ranges(layers: Iterable[int | range]) -> tuple[range, ...]:
    """Ranges (kept in the order given) from ints and ranges, each checked before anything is expanded."""
    out: list[range] = []
    for item in layers:
        if isinstance(item, range):
            if item.step != 1 or not 0 <= item.start < item.stop <= MAX_LAYERS:
                raise ValueError(
                    f"PartSpec layer ranges must be non-empty ranges within 0..{MAX_LAYERS}, got {item!r}"
                )
            out.append(item)
        elif isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < MAX_LAYERS:
            raise ValueError(f"PartSpec layers must be ints in 0..{MAX_LAYERS - 1}, got {item!r}")
        else:
            out.append(range(item, item + 1))
    return tuple(out)


def _merged(ranges: tuple[range, ...]) -> tuple[range, ...]:
    """Sorted, merged ranges; `ValueError` when two of them share a layer."""
    out: list[range] = []
    for r in sorted(ranges, key=lambda r: r.start):
        if out and r.start < out[-1].stop:
            raise ValueError(f"PartSpec layers must not repeat: {out[-1]!r} and {r!r} overlap")
        if out and r.start == out[-1].stop:
            out[-1] = range(out[-1].start, r.stop)
        else:
            out.append(r)
    return tuple(out)
