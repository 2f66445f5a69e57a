"""Making a rename durable: what atomic checkpoint and download writes both end with."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Flush folder's entries to disk so a rename into it survives a crash (a no-op where folders cannot be opened)."""
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
