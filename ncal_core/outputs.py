"""Where a command writes, checked before it reads a model or scores a row.

An output may not be one of the command's inputs (the rows, a model folder), may not write over a training run's or
a model's own files, and its folder must exist or be creatable and be writable. Each check fails as one NCALError
naming the flag, so a mistake costs nothing and loses nothing.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ncal_core.errors import NCALError
from ncal_core.run_record import RUN_FILE

# files that make a folder a model's or a training run's (a run, a checkpoint, an export, a base checkpoint)
RECORD_FILES = (RUN_FILE, "config.json", "adapter_config.json", "metrics.jsonl", "trainer_state.json")


def records_of(folder: Path) -> str | None:
    """What the folder holds the records of ("a training run", "a model"), None when neither."""
    if (folder / RUN_FILE).is_file() or (folder / "metrics.jsonl").is_file():
        return "a training run"
    if any((folder / name).is_file() for name in RECORD_FILES):
        return "a model"
    return None


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name one file or folder (through links and relative parts)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def writable_folder(flag: str, folder: Path, shown: Path | None = None) -> None:
    """Make `folder` (and its parents) and prove a file can be written there; NCALError naming the flag else."""
    shown = shown if shown is not None else folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-").close()
    except OSError as err:
        raise NCALError(f"{flag} {shown}: cannot write there ({err.strerror or err})") from None


def check_output_file(flag: str, path: str | Path, inputs: Iterable[tuple[str, str | Path | None]]) -> Path:
    """A file the command will write: not a folder, not an input file given as (flag, path), not an existing file of
    a model's or a run's folder; its folder made and writable."""
    out = Path(path)
    if out.is_dir():
        raise NCALError(f"{flag} {out}: is a folder; name a file")
    for input_flag, given in inputs:
        if given is not None and _same(out, Path(given)):
            raise NCALError(f"{flag} {out}: is the {input_flag} file; name another output file")
    holder = records_of(out.parent) if out.parent.is_dir() else None
    if holder and out.exists():
        raise NCALError(f"{flag} {out}: a file of {holder} ({out.parent}); name another output file")
    writable_folder(flag, out.parent, out)
    return out


def check_output_dir(flag: str, path: str | Path, inputs: Iterable[tuple[str, str | Path | None]], *,
                     writes: Iterable[str], overwrite: bool) -> Path:
    """A folder the command writes the files `writes` into: not an input folder, none of those files an input, not a
    model's or a run's folder unless `overwrite` (--overwrite_output_dir); made and writable."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NCALError(f"{flag} {out}: exists and is not a folder")
    for input_flag, given in inputs:
        if given is None or not Path(given).exists():
            continue
        given = Path(given)
        if _same(out, given):
            raise NCALError(f"{flag} {out}: is {input_flag}; name another folder")
        if any(_same(out / name, given) for name in writes):
            raise NCALError(f"{flag} {out}: would write over the {input_flag} file {given}; name another folder")
    holder = records_of(out) if out.is_dir() else None
    if holder and not overwrite:
        raise NCALError(f"{flag} {out}: holds the records of {holder}; name another folder, or pass "
                        "--overwrite_output_dir true to write over them")
    writable_folder(flag, out)
    return out


def check_new_folder(flag: str, path: str | Path) -> Path:
    """A folder the command creates whole: absent or empty, its parent made and writable."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NCALError(f"{flag} {out}: exists and is not an empty folder")
    writable_folder(flag, out.absolute().parent, out)
    return out
