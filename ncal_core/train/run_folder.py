"""The output folder of a run: who owns it, and what a resumed run keeps of its log."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from ncal_core.durable import TMP_PREFIX, write_text
from ncal_core.errors import NCALError
from ncal_core.outputs import writable_folder
from ncal_core.run_record import RUN_FILE, RunRecord
from ncal_core.train.checkpoint import PREFIX


def prepare_output_dir(output_dir: Path, cfg, *, resuming: bool) -> None:
    """Create the folder, refusing one that holds something else unless --overwrite_output_dir."""
    if output_dir.exists() and not output_dir.is_dir():
        raise NCALError(f"--output_dir {output_dir}: exists and is not a folder")
    base = Path(cfg.model_name_or_path)
    # the final weights would write over a base in the folder itself, and starting over deletes its checkpoints
    if base.is_dir() and (base.resolve() == output_dir.resolve()
                          or (not resuming and output_dir.resolve() in base.resolve().parents)):
        raise NCALError(f"--output_dir {output_dir}: holds --model_name_or_path {base}, which this run would write "
                        "over; name another folder")
    # a run file alone is left by a run that stopped before writing anything (bad data, a bad checkpoint)
    entries = [e for e in output_dir.iterdir() if e.name != RUN_FILE] if output_dir.is_dir() else []
    if entries and not resuming:
        if not cfg.overwrite_output_dir:
            what = "an earlier run" if (output_dir / RUN_FILE).exists() else "files of something else"
            raise NCALError(f"--output_dir {output_dir}: holds {what}; pass --resume_from_checkpoint latest to "
                            "continue a run, --overwrite_output_dir true to write over it, or another folder")
        # starting over: only this project's own checkpoints go (checkpoint-<step> and half-written ones, never
        # through a symlink), nothing the user put there
        for entry in entries:
            ours = entry.name.startswith(TMP_PREFIX) or (entry.name.startswith(PREFIX)
                                                         and entry.name[len(PREFIX):].isdigit())
            if ours and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    writable_folder("--output_dir", output_dir)
    RunRecord(config=asdict(cfg)).write(output_dir)


def truncate_log(path: Path, lines: int) -> None:
    """Keep the first `lines` lines of a JSONL log (a resumed run drops what was logged after its checkpoint)."""
    if not path.is_file():
        return
    # split on "\n" only: str.splitlines would also break inside a JSON string at U+2028
    kept = path.read_text(encoding="utf-8").split("\n")[:lines]
    write_text(path, "".join(line + "\n" for line in kept if line))
