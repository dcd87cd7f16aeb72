"""Checking a config's field values against the types its dataclass declares.

An ``adapter_config.json`` is user input: ``"use_rslora": "no"`` must not be read as true, a string
``modules_to_save`` must not be matched one character at a time, and ``NaN`` must not reach a scale.
:func:`check_field_types` refuses such values with a :class:`ConfigError` naming the field. Sequences
may be lists, tuples or sets (Python callers pass all three; JSON gives lists), integers are accepted
where floats are declared, ``bool`` is never an integer, and every float must be finite.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Union

from adapters_core.errors import ConfigError

_SEQUENCES = (list, tuple, set, frozenset)


_FIELD_TYPES: dict[type, dict[str, Any]] = {}  # by config class


def _field_types(cls: type) -> dict[str, Any]:
    if cls not in _FIELD_TYPES:
        hints = typing.get_type_hints(cls)
        _FIELD_TYPES[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _FIELD_TYPES[cls]


def _options(tp: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(tp)
    return typing.get_args(tp) if origin in (Union, types.UnionType) else (tp,)


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    for option in _options(tp):
        origin, args = typing.get_origin(option), typing.get_args(option)
        if option is type(None):
            ok = value is None
        elif option is bool:
            ok = isinstance(value, bool)
        elif option is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif option is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif option is str:
            ok = isinstance(value, str)
        elif origin is list:
            ok = isinstance(value, _SEQUENCES) and all(_matches(v, args[0]) for v in value)
        elif origin is tuple:
            ok = (isinstance(value, list | tuple) and len(value) == len(args)
                  and all(_matches(v, a) for v, a in zip(value, args, strict=True)))
        elif origin is dict:
            ok = isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1])
                                                 for k, v in value.items())
        else:  # a type this checker does not model: the config's own checks own it
            ok = True
        if ok:
            return True
    return False


def _describe(tp: Any) -> str:
    parts = []
    for option in _options(tp):
        origin, args = typing.get_origin(option), typing.get_args(option)
        if option is type(None):
            parts.append("null")
        elif option is bool:
            parts.append("true or false")
        elif option in (int, float, str):
            parts.append({int: "an integer", float: "a number", str: "a string"}[option])
        elif origin is list:
            parts.append(f"a list of {_plural(args[0])}")
        elif origin is tuple:
            parts.append(f"a pair of {_plural(args[0])}")
        elif origin is dict:
            parts.append(f"an object of {_plural(args[1])}")
        elif option is Any:
            parts.append("any value")
        else:
            parts.append(getattr(option, "__name__", str(option)))
    return " or ".join(parts)


def _plural(tp: Any) -> str:
    names = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
    if tp in names:
        return names[tp]
    if _options(tp) == (int, float):
        return "numbers"
    return f"values ({_describe(tp)})"


def holds_non_finite(value: Any) -> bool:
    """Whether ``value`` is, or (in dicts, lists, tuples and sets) holds, a NaN or infinite float."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(holds_non_finite(v) for v in value.values())
    if isinstance(value, _SEQUENCES):
        return any(holds_non_finite(v) for v in value)
    return False


def check_field_types(config: Any) -> None:
    """Raise :class:`ConfigError` (naming the field) for the first field of the dataclass ``config`` whose
    value does not fit its declared type, or that holds a NaN or infinite number."""
    for name, tp in _field_types(type(config)).items():
        value = getattr(config, name)
        if not _matches(value, tp):
            raise ConfigError(f"{name} must be {_describe(tp)}, got {value!r}", field=name)
        if holds_non_finite(value):
            raise ConfigError(f"{name} must be finite, got {value!r}", field=name)


__all__ = ["check_field_types", "holds_non_finite"]
