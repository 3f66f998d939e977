"""Typed config fields that carry their own checks, and the checker (recipes, teacher cards, method configs).

A dataclass field made with :func:`opt` keeps its validation in its metadata (``choices``, ``min``,
``max``, ``gt``, ``unique``); :func:`check_value` converts a TOML value to the field's type and applies
them, with a message that reads on from the key ("must be ...").
"""

from __future__ import annotations

import difflib
import math
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["check_config", "check_value", "opt", "show_value", "tomllib"]


def opt(default: Any, **checks: Any) -> Any:
    """A dataclass field carrying its validation: ``choices=(...)``, ``min`` (>=), ``max`` (<=), ``gt`` (>), ``unique``."""
    return field(default=default, metadata=checks)


_BAD = object()
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               dict: "a table", Any: "any value"}


def _arms(hint: Any) -> tuple[Any, ...]:
    """The members of a union hint (``str | None`` -> ``(str, NoneType)``), else ``(hint,)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` converted to ``hint``, or ``_BAD``. bool is never an int; ints are valid floats."""
    if len(_arms(hint)) > 1:
        for arm in _arms(hint):
            out = _coerce(value, arm)
            if out is not _BAD:
                return out
        return _BAD
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if hint is bool:
        return value if isinstance(value, bool) else _BAD
    if isinstance(value, bool) or value is None:
        # TOML has no null: an Optional field is left at None by leaving the key out.
        return _BAD
    if hint is int:
        if isinstance(value, int):
            return value
        return int(value) if isinstance(value, float) and value.is_integer() else _BAD
    if hint is float:
        return float(value) if isinstance(value, (int, float)) else _BAD
    if hint is str:
        return value if isinstance(value, str) else _BAD
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _BAD
        items = [_coerce(v, typing.get_args(hint)[0]) for v in value]
        return _BAD if any(v is _BAD for v in items) else items
    if hint is dict or origin is dict:
        return dict(value) if isinstance(value, Mapping) else _BAD
    return _BAD


def _describe(hint: Any, choices: Sequence[str] = ()) -> str:
    """Human words for a hint: ``"all", "last" or a list of integers``."""
    words: list[str] = []
    for arm in _arms(hint):
        if arm is type(None):
            continue
        if arm is str and choices:
            words += [f'"{c}"' for c in choices]
        elif typing.get_origin(arm) is list:
            inner = _TYPE_WORDS.get(typing.get_args(arm)[0], "values")
            words.append("a list of " + inner.replace("an integer", "integers").replace("a number", "numbers"))
        else:
            words.append(_TYPE_WORDS.get(typing.get_origin(arm) or arm, getattr(arm, "__name__", str(arm))))
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def show_value(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


def check_value(value: Any, hint: Any, checks: Mapping[str, Any] | None = None) -> Any:
    """``value`` converted to the type ``hint`` and checked against ``checks``; ``ValueError`` if not.

    ``checks``: ``choices`` (allowed strings), ``min`` / ``max`` (inclusive) and ``gt`` (exclusive)
    bounds for numbers and list entries, ``unique`` (no repeated list entries). Lists must be non-empty.
    The message reads on from the key ("must be ...") so callers prefix the key and the file.
    """
    checks = checks or {}
    choices = checks.get("choices", ())
    out = _coerce(value, hint)
    if out is _BAD:
        optional = " (leave the key out for none)" if type(None) in _arms(hint) else ""
        raise ValueError(f"must be {_describe(hint, choices)}{optional}, got {show_value(value)}")
    if isinstance(out, str) and choices and out not in choices:
        close = difflib.get_close_matches(out, choices, n=1)
        hint_ = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"must be {_describe(hint, choices)}, got {out!r}{hint_}")
    if isinstance(out, list) and choices:
        bad = [x for x in out if isinstance(x, str) and x not in choices]
        if bad:
            raise ValueError(f"entries must be among {', '.join(map(repr, choices))}, got {out!r} (unknown: {bad})")
    numbers = out if isinstance(out, list) else [out]
    must = "entries must be" if isinstance(out, list) else "must be"
    for x in numbers:
        if not isinstance(x, (int, float)) or isinstance(x, bool):
            continue
        if not math.isfinite(x):
            raise ValueError(f"{must} finite, got {out!r}")
        if "min" in checks and x < checks["min"]:
            raise ValueError(f"{must} >= {checks['min']}, got {out!r}")
        if "max" in checks and x > checks["max"]:
            raise ValueError(f"{must} <= {checks['max']}, got {out!r}")
        if "gt" in checks and x <= checks["gt"]:
            raise ValueError(f"{must} > {checks['gt']}, got {out!r}")
    if isinstance(out, list):
        if not out:
            raise ValueError("must not be an empty list")
        if checks.get("unique") and len(set(out)) != len(out):
            raise ValueError(f"must not repeat entries, got {out!r}")
    return out


def check_config(cfg: Any, section: str) -> Any:
    """Check every field of a config dataclass made of :func:`opt` fields (nested ones too) against its own
    declared checks; ``ValueError`` naming ``section.field``. Recipes are checked as they load; this is the
    same check for configs built in code."""
    import dataclasses

    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_config(value, f"{section}.{f.name}")
            continue
        try:
            check_value(value, hints[f.name], f.metadata)
        except ValueError as e:
            raise ValueError(f"{section}.{f.name} {e}") from None
    return cfg
