"""Plain data (as parsed from TOML) into checked dataclasses, every mistake a one-line UserError.

A field's type comes from its annotation (int, float, str, bool, list, dict, a nested dataclass, or
one of those or None); ``field(metadata=...)`` adds ``choices``, ``min`` and ``gt`` bounds.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import typing
from typing import Any

from .errors import UserError, closest

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list", dict: "a table"}


def choice(*values: str, doc: str | None = None) -> dict:
    return {"choices": tuple(values), **({"doc": doc} if doc else {})}


def _plain_type(tp: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of an annotation such as ``int``, ``X | None``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", ())):
        inner = [a for a in args if a is not type(None)]
        return inner[0], type(None) in args
    return typing.get_origin(tp) or tp, False


def check_value(value: Any, tp: Any, meta: Any, where: str) -> Any:
    tp, optional = _plain_type(tp)
    if value is None and optional:
        return None
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp in _NAMES and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise UserError(f"{where}: expected {_NAMES[tp]}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise UserError(f"{where}: must be a finite number, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise UserError(f"{where}: unknown value {value!r}{closest(str(value), meta['choices'])}; "
                        f"allowed: {', '.join(meta['choices'])}")
    if "min" in meta and value < meta["min"]:
        raise UserError(f"{where}: must be at least {meta['min']}, got {value!r}")
    if "gt" in meta and value <= meta["gt"]:
        raise UserError(f"{where}: must be greater than {meta['gt']}, got {value!r}")
    return value


def build(cls: type, raw: Any, where: str, base: Any = None) -> Any:
    """``cls(**raw)`` with every key and value checked; fields missing from raw come from ``base``
    (else their defaults; a field without a default is required)."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise UserError(f"{where}.{key}: unknown key{closest(key, fields)}; allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = check_value(raw[name], hints[name], f.metadata, f"{where}.{name}")
        elif base is not None:
            kwargs[name] = copy.deepcopy(getattr(base, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"{where}.{name}: missing")
    return cls(**kwargs)


def plain(obj: Any) -> Any:
    """A dataclass as plain data, leaving out the None fields of nested tables (TOML has no null)."""
    def strip(v: Any, top: bool) -> Any:
        if isinstance(v, dict):
            return {k: strip(x, False) for k, x in v.items() if top or x is not None}
        if isinstance(v, list):
            return [strip(x, False) for x in v]
        return v
    return strip(dataclasses.asdict(obj), True)
