"""Options as strings: ``"key=value,key=value"`` option strings (HF's ``optim_args`` style), parsed against a table of
typed keys so that a misspelt key or a value of the wrong type fails with the list of valid keys, before any work
starts; and HF's enum-valued options as the strings they stand for (``option_name``)."""

from __future__ import annotations

import math

from typing import Any

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def option_name(value) -> str:
    """An HF option that may be an enum (``IntervalStrategy``, ``OptimizerNames``, ``SchedulerType``, ...) or the
    plain string a user or a parser gave, as that string."""
    return str(getattr(value, "value", value))


def parse_key_values(text: str | None, types: dict[str, type], option: str, valid_text: str | None = None) -> dict:
    """``{key: typed value}`` from ``text``; ``option`` names the setting in error messages, ``valid_text``
    replaces the list of valid keys there (e.g. to say why there are none)."""
    parsed: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in types:
            raise ValueError(f"{option}: unknown or malformed entry {item!r}; valid keys: "
                             f"{valid_text or ', '.join(types)} (as key=value, comma-separated)")
        if key in parsed:
            raise ValueError(f"{option}: {key!r} given twice")
        parsed[key] = _convert(key, value.strip(), types[key], option)
    return parsed


def _convert(key: str, value: str, kind: type, option: str):
    if kind is bool and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    if kind is not bool:
        try:
            return kind(value)
        except ValueError:
            pass
    raise ValueError(f"{option}: {key}={value!r} is not a {kind.__name__}")


def require_positive_finite(value: float, what: str) -> None:
    """Refuse ``value`` unless it is a finite number > 0 (``nan`` fails every comparison and passes ``<= 0``
    checks silently); ``what`` names the setting, e.g. ``"adversarial_args: epsilon"``."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {value}")
