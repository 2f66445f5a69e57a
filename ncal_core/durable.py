"""Writes that survive a crash (fsync, atomic folder renames), and the cache root they fill."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

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
    """$NCAL_CACHE_DIR, else ~/.cache/ncal."""
    return Path(os.environ.get("NCAL_CACHE_DIR", Path.home() / ".cache" / "ncal"))


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
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
