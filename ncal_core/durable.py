"""Writes that survive a crash, the one JSON reader, and the cache root they fill.

Every write here goes to a temporary sibling first, is fsynced, and is renamed into place, so a reader
sees the old content or the new, never half of one: a file (`atomic_file`, `write_text`, `write_json`), a
folder (`write_atomically`), or files added to a folder that holds others (`add_files`). Every JSON file a
run writes is written by `write_json` and read back by `read_json`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from ncal_core.errors import NCALError

CACHE_DIR_ENV = "NCAL_CACHE_DIR"
TMP_PREFIX = ".tmp-checkpoint-"  # half-written folders: ignored, and swept by a run starting over


def fsync_dir(folder: Path) -> None:
    """Flush folder's entries to disk so a rename into it survives a crash (a no-op where folders cannot be opened)."""
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def cache_root() -> Path:
    """$NCAL_CACHE_DIR (when set and not empty), else ~/.cache/ncal: built tiny models and downloaded data."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "ncal").expanduser()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            _fsync_file(path)
    fsync_dir(folder)


@contextmanager
def atomic_file(dest: Path) -> Iterator[BinaryIO]:
    """A binary file to write `dest` through: renamed over dest when the block ends, dropped if it raises."""
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(dest.parent)


def write_text(dest: Path, text: str) -> None:
    """Replace file `dest` by `text` (UTF-8) atomically."""
    with atomic_file(dest) as out:
        out.write(text.encode("utf-8"))


def write_json(dest: Path, data: Any) -> None:
    """Replace file `dest` by `data` as indented UTF-8 JSON with a final newline, atomically."""
    write_text(dest, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path, what: str = "JSON file") -> dict[str, Any]:
    """The JSON object in `path`; a missing or malformed file, or one that holds no object, is refused in one line
    naming the file and `what` it should be."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NCALError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise NCALError(f"{path}: not a readable {what} (not valid JSON: {err})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise NCALError(f"{path}: not a readable {what} ({err})") from None
    if not isinstance(data, dict):
        raise NCALError(f"{path}: not a {what}: expected a JSON object, got {type(data).__name__}")
    return data


def add_files(folder: Path, fill: Callable[[Path], None]) -> None:
    """Let `fill` write files into a temporary folder inside `folder`, then rename each into `folder`."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-final-", dir=folder))
    fill(tmp)
    for path in sorted(tmp.iterdir()):
        _fsync_file(path)
        os.replace(path, folder / path.name)
    tmp.rmdir()
    fsync_dir(folder)


def write_atomically(target: Path, fill: Callable[[Path], None], *, replace: bool = True) -> Path:
    """Create folder `target` by letting `fill` write into a temporary sibling, then renaming it.

    An existing `target` is replaced; with replace=False it is kept and the new copy dropped, for a cache
    that several processes may fill with the same content at once (and read while another one writes).
    """
    tmp = target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    fill(tmp)
    _fsync_tree(tmp)
    if replace and target.exists():
        # replacing a checkpoint of the same step (a resumed run saving again): move the old one aside first
        old = target.parent / f"{TMP_PREFIX}old-{target.name}-{os.getpid()}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            # there already, or written by another process meanwhile (two runs building one cached tiny model)
            shutil.rmtree(tmp)
    fsync_dir(target.parent)
    return target
