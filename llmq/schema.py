"""Dicts (YAML, `--set key=value`) into the frozen config dataclasses, validated: unknown keys, wrong types
and bad values are ConfigErrors that name the key. Used by llmq/config.py's Recipe and by the benchmark's
config (scripts/bench_config.py)."""

from __future__ import annotations

import dataclasses
import types
from dataclasses import fields
from typing import Any, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse `--set key=value` items; values are YAML scalars/lists (`0.5`, `auto`, `[a, b]`)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r} (e.g. --set smoothing.alpha=0.8)")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            raise ConfigError(f"--set {k}: cannot parse value {v!r}") from None
    return out


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}: {name}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, where)
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union or origin is types.UnionType or (origin is not None and type(None) in args):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} has the wrong type")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, where) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build(cls: type, data: Any, where: str) -> Any:
    """Any frozen config dataclass (nested dataclasses, tuples) from a mapping, validated as a Recipe is:
    unknown keys and wrong types are ConfigErrors naming `where`. scripts/bench_config.py uses it."""
    return _build(cls, data, where)
