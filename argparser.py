"""Every entry's flags, built from its config dataclass: each field is a flag of the same name.

Precedence, lowest first: the dataclass defaults, the chosen --preset, a --config file (YAML or JSON with
field names as keys), then flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from utils import UserError

T = TypeVar("T")


def _flag_kwargs(field_type: Any) -> dict[str, Any]:
    origin = typing.get_origin(field_type)
    args = [a for a in typing.get_args(field_type) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:  # Optional[X]
        return _flag_kwargs(args[0])
    if field_type is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is list:
        return {"nargs": "+", "type": args[0]}
    if field_type in (int, float, str):
        return {"type": field_type}
    raise TypeError(f"no flag type for {field_type!r}")


def build_parser(cls: type, description: str, presets: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Gives a parser with one flag per field of `cls`; only flags actually given appear in the result."""
    parser = argparse.ArgumentParser(
        description=description,
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    if presets:
        parser.add_argument("--preset", choices=list(presets), help="a named starting configuration")
    parser.add_argument("--config", help="YAML or JSON file of field values (flags still win)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "preset":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        parser.add_argument(f"--{f.name}", help=f"(default: {default})", **_flag_kwargs(hints[f.name]))
    return parser


def _coerce(name: str, value: Any, field_type: Any) -> Any:
    """Gives a config-file value as its field's type (YAML reads `1e-3` as a string), or a clear UserError."""
    origin = typing.get_origin(field_type)
    args = [a for a in typing.get_args(field_type) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return None if value is None else _coerce(name, value, args[0])
    try:
        if origin is list:
            items = value if isinstance(value, list) else [value]
            return [_coerce(name, v, args[0]) for v in items]
        if field_type is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false", "yes", "no", "1", "0"):
                return str(value).lower() in ("true", "yes", "1")
            raise ValueError
        if field_type is int and (isinstance(value, bool) or float(value) != int(float(value))):
            raise ValueError
        return field_type(float(value)) if field_type is int else field_type(value)
    except (TypeError, ValueError):
        raise UserError(
            f"config file field {name}: expected {getattr(field_type, '__name__', field_type)}, got {value!r}"
        ) from None


def read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path!r} not found")
    try:
        data = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"config file {path!r} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"config file {path!r} must hold a mapping of field names to values")
    return data


def parse_config(
    cls: type[T],
    description: str,
    argv: Sequence[str] | None = None,
    presets: dict[str, Callable[[], T]] | None = None,
    default_preset: str | None = None,
) -> T:
    """Parses argv into an instance of `cls` (see the module docstring for precedence)."""
    presets = presets or {}
    args = vars(build_parser(cls, description, list(presets)).parse_args(argv))
    config_path = args.pop("config", None)
    overrides = read_config_file(config_path) if config_path else {}
    preset = args.pop("preset", None) or overrides.pop("preset", None) or default_preset  # a flag beats the file
    if preset is not None and preset not in presets:
        raise UserError(f"unknown preset {preset!r} (choose from {', '.join(presets)})")
    cfg = presets[preset]() if preset else cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UserError(f"config file has unknown field(s): {', '.join(unknown)}")
    overrides = {k: _coerce(k, v, hints[k]) for k, v in overrides.items()}
    overrides.update(args)
    if "preset" in names and preset:
        overrides["preset"] = preset
    return dataclasses.replace(cfg, **overrides)  # type: ignore[type-var]
