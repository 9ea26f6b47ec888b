"""Every entry's flags, config files and presets, built from its config dataclass by the same code.

Each field of the dataclass is a flag of the same name; its --help is the field's own help text and bounds
(`sparse_coding.config.option`), and its default is the one the entry actually starts from (its default preset).
Precedence, lowest first: the dataclass defaults, the chosen --preset, a --config file, then flags.

Config files map field names to values: YAML (.yaml, .yml), JSON (.json), or nanoGPT-style Python (.py) made of
`name = value` lines. A .py file is parsed, never run: values are literals, names assigned above, and + - * / **
between them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import operator
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml

from sparse_coding.config import field_types
from sparse_coding.errors import ConfigError

T = TypeVar("T")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr and exit 2, like every other user error."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _flag_kwargs(field_type: Any) -> dict[str, Any]:
    if field_type is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(field_type) is list:
        return {"nargs": "+", "type": typing.get_args(field_type)[0]}
    if field_type in (int, float, str):
        return {"type": field_type}
    raise TypeError(f"no flag type for {field_type!r}")


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def field_help(f: dataclasses.Field, default: Any) -> str:
    """Gives a field's --help line: what it means, the values it takes, and its default."""
    meta = f.metadata
    words = [meta.get("help") or f.name.replace("_", " ")]
    if meta.get("choices"):
        words.append(f"[{', '.join(map(str, meta['choices']))}]")
    words.append(f"(default: {_show(default)})")
    return " ".join(words).replace("%", "%%")  # argparse %-formats help strings


def add_fields(
    parser: argparse.ArgumentParser,
    cls: type,
    defaults: Any = None,
    only: Callable[[dataclasses.Field], bool] | None = None,
    dashed_aliases: bool = False,
) -> None:
    """Adds one flag per field of `cls` (those `only` keeps); `defaults` is the instance whose values --help
    shows. Flags not given do not appear in the parsed result (the parser's argument_default is SUPPRESS)."""
    defaults = defaults if defaults is not None else cls()
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name == "preset" or (only is not None and not only(f)):
            continue
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if dashed_aliases and "_" in f.name else [])
        help_ = field_help(f, getattr(defaults, f.name))
        parser.add_argument(*names, dest=f.name, help=help_, **_flag_kwargs(types_[f.name]))


# ---- config files ----


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Gives the field values in a YAML, JSON or nanoGPT-style .py config file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e}") from None
    if p.suffix == ".py":
        return read_python_config(text, str(path))
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if p.suffix == ".json" else "YAML"
        raise ConfigError(f"config file {str(path)!r} is not valid {kind}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of field names to values")
    return data


_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _value(node: ast.AST, names: dict[str, Any]) -> Any:
    """Gives the value of a literal expression, allowing names assigned above and arithmetic between numbers;
    anything else (calls, attributes, subscripts, comprehensions) is refused, so nothing can run."""
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise ValueError(f"{node.id!r} is not assigned above")
        return names[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_value(e, names) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_number(_value(node.operand, names)))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _number(_value(node.left, names)), _number(_value(node.right, names))
        if isinstance(node.op, ast.Pow) and abs(right) > 1024:
            raise ValueError("exponent too large")
        return _OPS[type(node.op)](left, right)
    return ast.literal_eval(node)


def _number(v: Any) -> int | float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"arithmetic needs numbers, got {v!r}")
    return v


def read_python_config(text: str, where: str) -> dict[str, Any]:
    """Gives the `name = value` assignments of a nanoGPT-style config file, without executing it."""
    try:
        tree = ast.parse(text, filename=where)
    except SyntaxError as e:
        raise ConfigError(f"config file {where!r} line {e.lineno}: {e.msg}") from None
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # a docstring
            continue
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ConfigError(f"config file {where!r} line {node.lineno}: only `name = value` lines are allowed")
        try:
            values[node.targets[0].id] = _value(node.value, values)
        except (ValueError, TypeError, SyntaxError, ZeroDivisionError, OverflowError) as e:
            raise ConfigError(f"config file {where!r} line {node.lineno}: not a plain value ({e})") from None
    return values


# ---- merging: defaults < preset < file < flags ----


def coerce(name: str, value: Any, field_type: Any, where: str = "config") -> Any:
    """Gives a config-file value as its field's type (YAML reads `1e-3` as a string), or a ConfigError."""
    if value is None:
        return None
    try:
        if typing.get_origin(field_type) is list:
            items = value if isinstance(value, (list, tuple)) else [value]
            return [coerce(name, v, typing.get_args(field_type)[0], where) for v in items]
        if field_type is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false", "yes", "no", "1", "0"):
                return str(value).lower() in ("true", "yes", "1")
            raise ValueError
        if field_type is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if field_type is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return field_type(value)
    except (TypeError, ValueError, OverflowError):
        kind = getattr(field_type, "__name__", field_type)
        raise ConfigError(f"{where} field {name}: expected {kind}, got {value!r}") from None


def coerce_all(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Gives `values` coerced to the field types of `cls`; names that are not fields are refused."""
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"{where} has unknown field(s): {', '.join(unknown)}")
    return {k: coerce(k, v, types_[k], where) for k, v in values.items()}


def _bool_equals_flags(argv: Sequence[str], cls: type) -> list[str]:
    """Rewrites nanoGPT's --flag=True / --flag=False into argparse's --flag / --no-flag."""
    types_ = field_types(cls)
    out = []
    for a in argv:
        key, eq, val = a[2:].partition("=")
        if a.startswith("--") and eq and types_.get(key) is bool:
            if val.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"--{key} takes True or False, got {val!r}")
            a = f"--{key}" if val.lower() in ("true", "1") else f"--no-{key}"
        out.append(a)
    return out


def parse_config(
    cls: type[T],
    description: str,
    argv: Sequence[str] | None = None,
    presets: dict[str, Callable[[], T]] | None = None,
    default_preset: str | None = None,
) -> T:
    """Parses argv into a checked instance of `cls` (see the module docstring for precedence)."""
    presets = presets or {}
    start = presets[default_preset]() if default_preset else cls()
    parser = Parser(
        description=description,
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if presets:
        parser.add_argument(
            "--preset", choices=list(presets), help=f"a named starting configuration (default: {default_preset})"
        )
    parser.add_argument("--config", help="YAML, JSON or nanoGPT-style .py file of field values (flags still win)")
    add_fields(parser, cls, start)
    args = vars(parser.parse_args(_bool_equals_flags(list(sys.argv[1:] if argv is None else argv), cls)))
    config_path = args.pop("config", None)
    file_values = read_config_file(config_path) if config_path else {}
    preset = args.pop("preset", None) or file_values.pop("preset", None) or default_preset  # a flag beats the file
    if preset is not None and preset not in presets:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(presets)})")
    values = coerce_all(cls, file_values, f"config file {config_path!r}")
    values.update(args)
    if "preset" in field_types(cls) and preset:
        values["preset"] = preset
    return dataclasses.replace(presets[preset]() if preset else cls(), **values)  # type: ignore[type-var]
