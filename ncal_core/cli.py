"""One parser for every command: a config dataclass becomes flags, a JSON/YAML file and defaults.

Each field of the dataclass is one flag of the same name; its `metadata["help"]` is the help text.
Precedence: defaults < `--config FILE` < flags on the command line. Booleans are written
`true`/`false` like the reference's HfArgumentParser; list fields take comma-separated values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from ncal_core.errors import NCALError

C = TypeVar("C")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def flag(default: Any, help: str) -> Any:
    """A config dataclass field: its default and its --help text."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def parse_bool(text: str | bool) -> bool:
    """`true`/`false` (and yes/no, 1/0) as the reference writes booleans."""
    if isinstance(text, bool):
        return text
    word = str(text).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, is_list) of a field annotation such as `int | None` or `list[str] | None`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _convert(name: str, raw: Any, annotation: Any, source: str) -> Any:
    """Turn a flag or config-file value into the field's type; NCALError naming the flag otherwise."""
    kind, is_list = _base_type(annotation)
    if raw is None or (isinstance(raw, str) and raw.lower() in {"none", "null"} and kind is not str):
        return None
    try:
        if is_list:
            items = raw if isinstance(raw, list) else [p for p in str(raw).split(",") if p.strip()]
            return [kind(str(p).strip()) for p in items]
        if kind is bool:
            return parse_bool(raw)
        if kind in (int, float) and isinstance(raw, bool):
            raise ValueError("a boolean is not a number")
        if kind is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError("not a whole number")
        return kind(raw)
    except (TypeError, ValueError) as err:
        raise NCALError(f"{source}: --{name}: {err}") from None


def _read_config_file(path: str) -> dict[str, Any]:
    """Keys and values of a JSON or YAML config file whose keys are flag names."""
    file = Path(path)
    if not file.is_file():
        raise NCALError(f"{path}: config file not found")
    text = file.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise NCALError(f"{path}: not valid {'JSON' if file.suffix == '.json' else 'YAML'}: "
                        f"{str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise NCALError(f"{path}: a config file must hold a mapping of flag names to values")
    return data


def _help(field: dataclasses.Field) -> str:
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if default is None:
        return field.metadata.get("help", "")
    if isinstance(default, list):
        default = ",".join(map(str, default))
    elif isinstance(default, bool):
        default = str(default).lower()
    return f"{field.metadata.get('help', '')} (default: {default})"


def parse_config(cls: type[C], argv: list[str] | None, description: str, prog: str) -> C:
    """Build `cls` from defaults, an optional `--config` file and the command line."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", metavar="FILE",
                        help="JSON or YAML file whose keys are flag names; flags given here win")
    for name, field in fields.items():
        kind, is_list = _base_type(hints[name])
        metavar = "true|false" if kind is bool else ("A,B,..." if is_list else kind.__name__.upper())
        parser.add_argument(f"--{name}", default=None, metavar=metavar, help=_help(field))

    def error(message: str) -> typing.NoReturn:
        raise NCALError(f"command line: {message} (see --help)")

    parser.error = error  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        for key, raw in _read_config_file(args.config).items():
            if key not in fields:
                raise NCALError(f"{args.config}: {key}: not a flag of {prog}")
            values[key] = _convert(key, raw, hints[key], args.config)
    for name in fields:
        raw = getattr(args, name)
        if raw is not None:
            values[name] = _convert(name, raw, hints[name], "command line")
    return cls(**values)
