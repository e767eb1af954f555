"""YAML values -> the annotated types of the config dataclasses: unions, literals, mappings,
tuples, bools, whole numbers, finite floats (YAML 1.1 reads `1e-3` as text), strings. Unknown keys
are errors, so a typo in params.yaml never falls back to a default silently."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from chexops.config.schema import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} must be one of {typing.get_args(tp)}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vtype = typing.get_args(tp)
        return {str(k): _coerce(v, vtype, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        return _coerce_tuple(value, typing.get_args(tp), key)
    return _coerce_scalar(value, tp, key)


def _coerce_union(value: Any, options: tuple[Any, ...], key: str) -> Any:
    """The first option that takes the value; else the most telling option's error."""
    if value is None and type(None) in options:
        return None
    errors: dict[Any, ConfigError] = {}
    for option in options:
        if option is type(None):
            continue
        try:
            return _coerce(value, option, key)
        except ConfigError as exc:
            errors[typing.get_origin(option) or option] = exc
    # a list that fails as a tuple (or a mapping as a section) has the telling message
    if isinstance(value, (list, tuple)) and tuple in errors:
        raise errors[tuple]
    if isinstance(value, dict):
        for option, error in errors.items():
            if dataclasses.is_dataclass(option):
                raise error
    raise ConfigError(f"{key}: {value!r} is not any of "
                      f"{', '.join(_type_name(o) for o in options)}")


def _coerce_tuple(value: Any, args: tuple[Any, ...], key: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{key}: expected a list of {len(args)} values, got {list(value)!r}")
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    """bool, int (never a bool), finite float (YAML reads 1e-3 without a dot as text), str."""
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected a whole number, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected text, got {value!r}")
    if tp in (bool, int, str):
        return value
    if tp is not float:
        raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return float(value)


def build(cls: Any, raw: Any, prefix: str) -> Any:
    """An instance of the dataclass `cls` from a YAML mapping; `prefix` is its dotted key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, raw)) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} in params.yaml; "
                          f"known keys here: {', '.join(sorted(names))}")
    kwargs = {name: _coerce(raw[name], hints[name], f"{prefix}.{name}" if prefix else name)
              for name in names if name in raw}
    return cls(**kwargs)


