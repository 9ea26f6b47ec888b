"""Config dataclasses: every field says what it means and which values it takes, in one place.

    lr: float = option(1e-3, "Adam learning rate", gt=0)

The help text becomes the flag's `--help` (argparser.py), and the bounds and choices are checked for every field
when the config is made (`Config.__post_init__`), so a bad value fails once, with one message naming the field,
before any work starts. Floats must also be finite. Checks that tie several fields together go in `check()`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from functools import cache
from typing import Any

from sparse_coding.errors import ConfigError


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    group: str | None = None,
) -> Any:
    """A dataclass field with its help text, allowed choices and bounds (bounds apply to each item of a list)."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if group is not None:
        metadata["group"] = group
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@cache
def field_types(cls: type) -> dict[str, Any]:
    """Gives each field's type with `Optional[X]` reduced to X (annotations are strings under __future__)."""
    hints = typing.get_type_hints(cls)
    return {f.name: strip_optional(hints[f.name]) for f in dataclasses.fields(cls)}


def strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _check_value(name: str, value: Any, tp: Any, meta: dict[str, Any]) -> None:
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        if not value:
            raise ConfigError(f"{name} must list at least one value")
        for item in value:
            _check_value(name, item, typing.get_args(tp)[0], meta)
        return
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be {getattr(tp, '__name__', tp)}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    for key, ok, word in (
        ("ge", lambda v, b: v >= b, "≥"),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "≤"),
        ("lt", lambda v, b: v < b, "<"),
    ):
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{name} must be {word} {bound:g}, got {value!r}")


def check_fields(cfg: Any) -> None:
    """Raises ConfigError for the first field whose value has the wrong type, is not finite, or breaks its
    declared choices or bounds."""
    types_ = field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None and types_[f.name] is not type(None) and f.default is None:
            continue  # an Optional field left unset
        _check_value(f.name, value, types_[f.name], dict(f.metadata))


class Config:
    """Base of every config dataclass: checks each field on creation, then the cross-field rules in check()."""

    def __post_init__(self) -> None:
        check_fields(self)
        self.check()

    def check(self) -> None:
        """Cross-field rules; subclasses extend it (calling super().check()) and raise ConfigError."""
