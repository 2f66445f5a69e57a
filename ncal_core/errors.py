"""The one error type for the user's mistakes, and the wrapper that turns it into one line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


class NCALError(Exception):
    """A mistake in what the user gave (a file, a row, a flag, a checkpoint): reported as one line, exit 2."""


def at(path: str | Path, line: int | None = None, field: str | None = None) -> str:
    """Where a problem is, as `path:line: field` (parts that are unknown are left out)."""
    place = str(path) if line is None else f"{path}:{line}"
    return f"{place}: {field}" if field else place


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a command's `main`; an NCALError becomes one line on stderr and exit code 2."""
    try:
        code = main(argv)
    except NCALError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
