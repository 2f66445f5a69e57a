"""One parser for every command: a config dataclass becomes flags, a JSON/YAML file and defaults.

Each field of the dataclass is one flag of the same name; its `metadata["help"]` is the help text.
Precedence: defaults < `--config FILE` < flags on the command line. Booleans are written
`true`/`false` like the reference's HfArgumentParser, and a bare `--flag` means true; list fields
take comma-separated values. Flags must be spelled out: a prefix (`--lr` for `--lr_scheduler_type`)
is refused with the closest real flag named, never taken for the flag it abbreviates.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
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

# Common short names that difflib cannot tie to their flag (too few letters in common); consulted
# only when get_close_matches finds nothing, and only for flags the command has.
_ALIASES = {"lr": "learning_rate"}


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
            items = raw if isinstance(raw, list) else str(raw).split(",")
            if not all(str(p).strip() for p in items):
                raise ValueError(f"an empty name in {raw!r}")
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


def default_text(field: dataclasses.Field) -> str | None:
    """A field's default as a user writes it on the command line (`true`, `a,b`); None when it has none.

    --help and docs/flags.md both print it, so the two cannot disagree.
    """
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if default is None:
        return None
    if isinstance(default, list):
        return ",".join(map(str, default))
    if isinstance(default, bool):
        return str(default).lower()
    return str(default)


def _help(field: dataclasses.Field) -> str:
    default = default_text(field)
    if default is None:
        return field.metadata.get("help", "")
    return f"{field.metadata.get('help', '')} (default: {default})"


def did_you_mean(name: str, names: list[str]) -> str:
    """`; did you mean --x?` for the real flag closest to a misspelt or abbreviated `name`, else ''."""
    word = name.lstrip("-")
    close = difflib.get_close_matches(word, names, n=1) or difflib.get_close_matches(word.replace("-", "_"), names, n=1)
    if not close and _ALIASES.get(word) in names:
        close = [_ALIASES[word]]
    return f"; did you mean --{close[0]}?" if close else ""


def _option_name(arg: str) -> str | None:
    """The flag an argv word names (`--x` or `--x=value` -> `--x`); None for a value.

    Mirrors how argparse sorts words: one starting with '-' is a flag unless it is a negative number
    or (before any '=') holds a space.
    """
    if len(arg) < 2 or not arg.startswith("-"):
        return None
    name = arg.split("=", 1)[0]
    if " " in name or _looks_negative(arg):
        return None
    return name


def _looks_negative(arg: str) -> bool:
    try:
        float(arg)
    except ValueError:
        return False
    return True


def _refuse_unknown_flags(argv: list[str], known: set[str], names: list[str]) -> None:
    """NCALError for the first flag in `argv` that is not spelled exactly as one of `known`.

    argparse's allow_abbrev=False already refuses prefixes on the Pythons we know, but this check
    does not depend on that, and it can name the flag that was probably meant.
    """
    for arg in argv:
        if arg == "--":  # argparse reads everything after it as values
            return
        name = _option_name(arg)
        if name is not None and name not in known:
            raise NCALError(f"command line: {name}: no such flag{did_you_mean(name, names)} (see --help)")


def _add_field(parser: argparse.ArgumentParser, name: str, field: dataclasses.Field, annotation: Any) -> list[str]:
    """One field as a flag (a boolean may stand alone: `--flag` is `--flag true`); its option strings."""
    kind, is_list = _base_type(annotation)
    if kind is bool:
        action = parser.add_argument(f"--{name}", default=None, nargs="?", const="true", metavar="true|false",
                                     help=_help(field))
    else:
        action = parser.add_argument(f"--{name}", default=None, metavar="A,B,..." if is_list else kind.__name__.upper(),
                                     help=_help(field))
    return action.option_strings


def parse_config(cls: type[C], argv: list[str] | None, description: str, prog: str) -> C:
    """Build `cls` from defaults, an optional `--config` file and the command line."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    known = {"-h", "--help"}
    known.update(parser.add_argument("--config", metavar="FILE",
                                     help="JSON or YAML file whose keys are flag names; flags given here win")
                 .option_strings)
    for name, field in fields.items():
        known.update(_add_field(parser, name, field, hints[name]))

    def error(message: str) -> typing.NoReturn:
        raise NCALError(f"command line: {message} (see --help)")

    parser.error = error  # type: ignore[method-assign]
    argv = sys.argv[1:] if argv is None else list(argv)
    _refuse_unknown_flags(argv, known, [*fields, "config", "help"])
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        for key, raw in _read_config_file(args.config).items():
            if key not in fields:
                raise NCALError(f"{args.config}: {key}: not a flag of {prog}{did_you_mean(key, list(fields))}")
            values[key] = _convert(key, raw, hints[key], args.config)
    for name in fields:
        raw = getattr(args, name)
        if raw is not None:
            values[name] = _convert(name, raw, hints[name], "command line")
    return cls(**values)
