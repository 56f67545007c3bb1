"""Checks of `config.json` values against a config dataclass's field types, naming the field that fails.

`config field X must be ...` for a value of the wrong type (a string or a bool where a number belongs), a
size or count that is not positive, an epsilon that is not positive, a name outside its choices. Field
metadata says which checks apply: `positive(...)`, `non_negative(...)`, `epsilon(...)`, `choice(...)`.
"""

from __future__ import annotations

import types
from dataclasses import MISSING, Field, field
from typing import Any, Union, get_args, get_origin

POSITIVE = "positive"
NON_NEGATIVE = "non_negative"
EPSILON = "epsilon"
CHOICES = "choices"


def positive(default: Any = MISSING) -> Any:
    """A size or count: an int > 0 (None only where the type allows it)."""
    return field(default=default, metadata={POSITIVE: True})


def non_negative(default: Any = MISSING) -> Any:
    """A count that may be zero (dense layers before the first MoE one, shared experts ...)."""
    return field(default=default, metadata={NON_NEGATIVE: True})


def epsilon(default: Any = MISSING) -> Any:
    """A norm's epsilon: a number > 0."""
    return field(default=default, metadata={EPSILON: True})


def choice(names: tuple[str, ...], default: Any = MISSING) -> Any:
    """One of `names` (an activation, a routing method ...)."""
    return field(default=default, metadata={CHOICES: names})


def typed_value(name: str, value: Any, tp: Any) -> Any:
    """`value` converted to `tp` (int, float, bool, str, tuple[X, ...], list[X], X | None, unions of these);
    ValueError naming `name` when it is not one."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return typed_value(name, value, option)
            except ValueError:
                pass
        raise ValueError(f"config field {name} must be {_describe(tp)}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config field {name} must be a list, got {value!r}")
        item = get_args(tp)[0]
        items = [typed_value(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config field {name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ValueError(f"config field {name} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config field {name} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config field {name} must be a string, got {value!r}")
        return value
    return value  # dicts and objects built by the config itself (rope_parameters)


def check_field(f: Field[Any], value: Any) -> None:
    """The metadata checks of one field on its typed value."""
    if value is None:
        return
    if f.metadata.get(POSITIVE):
        values = value if isinstance(value, tuple) else (value,)
        if any(v <= 0 for v in values):
            raise ValueError(f"config field {f.name} must be positive, got {value!r}")
    if f.metadata.get(NON_NEGATIVE) and value < 0:
        raise ValueError(f"config field {f.name} must not be negative, got {value!r}")
    if f.metadata.get(EPSILON) and not value > 0:
        raise ValueError(f"config field {f.name} must be a positive epsilon, got {value!r}")
    names = f.metadata.get(CHOICES)
    if names is not None and value not in names:
        raise ValueError(f"config field {f.name}: unsupported value {value!r}; supported: {', '.join(names)}")


def _describe(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    parts = [names.get(a, "a list") for a in get_args(tp) if a is not type(None)]
    if type(None) in get_args(tp):
        parts.append("null")
    return " or ".join(parts)
