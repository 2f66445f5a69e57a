"""The output folder of a run: who owns it, and the final model files written into it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ncal_core.checkpoint import PREFIX, TMP_PREFIX
from ncal_core.errors import NCALError

RUN_FILE = "ncal_run.json"


def prepare_output_dir(output_dir: Path, cfg, *, resuming: bool) -> None:
    """Create the folder, refusing one that holds something else unless --overwrite_output_dir."""
    if output_dir.exists() and not output_dir.is_dir():
        raise NCALError(f"--output_dir {output_dir}: exists and is not a folder")
    entries = list(output_dir.iterdir()) if output_dir.is_dir() else []
    if entries and not resuming:
        if not cfg.overwrite_output_dir:
            what = "an earlier run" if (output_dir / RUN_FILE).exists() else "files of something else"
            raise NCALError(f"--output_dir {output_dir}: holds {what}; pass --resume_from_checkpoint latest to "
                            "continue a run, --overwrite_output_dir true to write over it, or another folder")
        # starting over: only this project's own checkpoints go, nothing the user put there
        for entry in entries:
            if entry.is_dir() and (entry.name.startswith(PREFIX) or entry.name.startswith(TMP_PREFIX)):
                shutil.rmtree(entry)
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-")
        probe.close()
    except OSError as err:
        raise NCALError(f"--output_dir {output_dir}: cannot write there ({err.strerror})") from None
    (output_dir / RUN_FILE).write_text(json.dumps(asdict(cfg), indent=2, ensure_ascii=False), encoding="utf-8")


def save_run_output(output_dir: Path, save_weights: Callable[[Path], None]) -> None:
    """Write the final weights into output_dir: into a temporary folder first, then each file renamed in."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-final-", dir=output_dir))
    save_weights(tmp)
    for path in sorted(tmp.iterdir()):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(path, output_dir / path.name)
    tmp.rmdir()
