from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_sepweight import PartSpec


@pytest.mark.parametrize(
    "text, begin, layers, end",
    [
        ("b 0-12", True, tuple(range(12)), False),
        ("12-24", False, tuple(range(12, 24)), False),
        ("24-32 e", False, tuple(range(24, 32)), True),
        ("b e", True, (), True),
        ("b 0-2 5-7 e", True, (0, 1, 5, 6), True),
        ("  b   0-1  ", True, (0,), False),
    ],
)
def test_parse(text: str, begin: bool, layers: tuple[int, ...], end: bool) -> None:
    spec = PartSpec.parse(text)
    assert (spec.begin, spec.layers, spec.end, spec.full) == (begin, layers, end, False)
    assert PartSpec.parse(str(spec)) == spec


def test_full_and_resolve() -> None:
    spec = PartSpec.parse("f")
    assert spec.full and str(spec) == "f"
    assert spec.resolve(3) == PartSpec(begin=True, layers=(0, 1, 2), end=True)
    assert PartSpec.parse("b 0-3").resolve(3) == PartSpec(begin=True, layers=(0, 1, 2))
    assert PartSpec.parse("b 0-3 7-9").ranges == (range(0, 3), range(7, 9))


def test_direct_construction_sorts() -> None:
    spec = PartSpec(begin=True, layers=(1, 0), end=False)
    assert spec.layers == (0, 1) and str(spec) == "b 0-2"


@pytest.mark.parametrize(
    "text, token",
    [
        ("", "empty"),
        ("x", "'x'"),
        ("0-3 2-5", "'2-5'"),
        ("5-8 0-3", "'0-3'"),
        ("3-3", "'3-3'"),
        ("5-2", "'5-2'"),
        ("e 0-3", "'e'"),
        ("0-3 b", "'b'"),
        ("f 0-3", "'f'"),
        ("b 0-3-4", "'0-3-4'"),
        ("-1-3", "'-1-3'"),
        ("b b", "'b'"),
    ],
)
def test_bad_specs_name_the_token(text: str, token: str) -> None:
    with pytest.raises(ValueError, match=token):
        PartSpec.parse(text)


def test_out_of_range_names_the_token() -> None:
    with pytest.raises(ValueError, match="'28-32'"):
        PartSpec.parse("b 0-4 28-32").resolve(30)


def test_bad_direct_construction() -> None:
    with pytest.raises(ValueError):
        PartSpec(layers=(0, 0))
    with pytest.raises(ValueError):
        PartSpec(layers=(-1,))
    with pytest.raises(ValueError):
        PartSpec(begin=False, full=True)
    with pytest.raises(ValueError):
        PartSpec(layers=(0,), full=True)
    assert PartSpec(begin=True, end=True, full=True) == PartSpec(full=True)  # 0.10 wrote 'f' so


@st.composite
def specs(draw: st.DrawFn) -> PartSpec:
    layers = draw(st.sets(st.integers(0, 60), max_size=20))
    begin, end = draw(st.booleans()), draw(st.booleans())
    if not (layers or begin or end):
        begin = True
    return PartSpec(begin=begin, layers=tuple(layers), end=end)


@given(specs())
def test_str_round_trips(spec: PartSpec) -> None:
    assert PartSpec.parse(str(spec)) == spec
    assert [i for r in spec.ranges for i in r] == list(spec.layers)


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(1, 10)), max_size=6), st.booleans(), st.booleans())
def test_parse_ranges_matches_python_ranges(pairs: list[tuple[int, int]], begin: bool, end: bool) -> None:
    tokens, stop, layers = [], 0, []
    for gap, length in pairs:
        start = stop + gap
        stop = start + length
        tokens.append(f"{start}-{stop}")
        layers += range(start, stop)
    text = " ".join((["b"] if begin else []) + tokens + (["e"] if end else []))
    if not text:
        return
    spec = PartSpec.parse(text)
    assert spec.layers == tuple(layers) and spec.begin == begin and spec.end == end
    if layers:
        with pytest.raises(ValueError):
            spec.resolve(layers[-1])
        assert spec.resolve(layers[-1] + 1) == spec


@given(st.text(max_size=20))
def test_parse_garbage_raises_value_error_only(text: str) -> None:
    with contextlib.suppress(ValueError):
        PartSpec.parse(text)
