"""Config values from YAML files and ``KEY=VALUE`` overrides, converted to their dataclass field's
annotated type (bool, int, float, str, or Optional of one), with a ValueError naming the field.

YAML guesses types from the text: ``1e-4`` is a string, ``'false'`` quoted is a string, ``2:1`` is the
integer 121 and ``0123`` the integer 83 (YAML 1.1). A field's annotation decides instead: an override
of a str field keeps its text as typed, and every value of a bool/int/float field is converted or
rejected. ``None`` / ``null`` (any case) is None for every field, as in the public YAMLs, except where it
names an enum field's member (``threshold_function: NONE``).
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import typing
from typing import Any, Dict, Optional, Sequence

import yaml

SCALARS = (bool, int, float, str)


def none_string(value: Any, empty: bool = False) -> Any:
    """None for the YAML texts "None" / "null" (any case; also "" with ``empty``), else the value."""
    words = ("none", "null", "") if empty else ("none", "null")
    return None if isinstance(value, str) and value.strip().lower() in words else value


@functools.lru_cache(maxsize=None)
def field_kinds(cls) -> Dict[str, Optional[type]]:
    """Field name -> bool/int/float/str or an Enum class (Optional unwrapped), or None for any other."""
    hints = typing.get_type_hints(cls)
    kinds = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) is typing.Union and len(args) == 1:
            kind = args[0]
        kinds[f.name] = kind if kind in SCALARS or _is_enum(kind) else None
    return kinds


def _is_enum(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, enum.Enum)


def coerce(name: str, value: Any, kind: Optional[type]) -> Any:
    """``value`` as a ``kind`` (see :func:`field_kinds`; None: as it is). An enum field's value is
    left to the config to parse, and a member's name stays one: ``threshold_function: NONE`` is
    ThresholdType.NONE, not None."""
    if _is_enum(kind) and isinstance(value, str) and value.strip().upper() in kind.__members__:
        return value
    value = none_string(value)
    if value is None or kind is None or _is_enum(kind):
        return value
    try:
        if kind is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("true", "yes", "on", "1"):
                    return True
                if low in ("false", "no", "off", "0"):
                    return False
                raise ValueError
            if value not in (0, 1):
                raise ValueError
            return bool(value)
        if kind is int:
            if isinstance(value, str):
                value = float(value) if any(ch in value for ch in ".eE") else int(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config field {name!r}: expected {kind.__name__}, got {value!r}") from None


def dataclass_from(cls, d: Dict[str, Any], where: str, ignored: Sequence[str] = (), **overrides: Any) -> Any:
    """``cls`` from the mapping ``d``, each value as its field's type (:func:`coerce`, errors named
    ``where.field``); a field it does not know is a ValueError listing the known ones (``ignored`` ones
    are dropped); ``overrides`` are passed as they are."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping of fields, got {d!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names - set(ignored))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(names)}")
    kinds = field_kinds(cls)
    kwargs = {k: coerce(f"{where}.{k}", v, kinds[k]) for k, v in d.items() if k in names}
    kwargs.update(overrides)
    return cls(**kwargs)


def parse_override(text: str, kind: Optional[type]) -> Any:
    """An override's text as YAML, except for a str field, whose text is kept as typed."""
    if kind is str:
        return none_string(text)
    return yaml.safe_load(text)
