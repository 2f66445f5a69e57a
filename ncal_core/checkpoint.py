"""Checkpoints written atomically and read back without executing anything from them.

A checkpoint is a folder `checkpoint-<step>` holding the trainable weights (a PEFT adapter or a
full Hugging Face checkpoint), `optimizer.pt` (tensors only; read with weights_only=True),
`rng.safetensors` and `trainer_state.json`. It is written into a hidden temporary folder, every
file fsynced, then renamed into place, so a crash leaves either the old set or the new one; a
temporary folder left by a crash is ignored with a warning.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ncal_core.errors import NCALError

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "trainer_state.json"


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(target: Path, fill: Callable[[Path], None]) -> Path:
    """Create folder `target` by letting `fill` write into a temporary sibling, then renaming it."""
    tmp = target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    fill(tmp)
    _fsync_tree(tmp)
    if target.exists():
        # replacing a checkpoint of the same step (a resumed run saving again): move the old one aside first
        old = target.parent / f"{TMP_PREFIX}old-{target.name}-{os.getpid()}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)
    _fsync_dir(target.parent)
    return target


def save_checkpoint(output_dir: Path, step: int, *, save_weights: Callable[[Path], None],
                    optimizer: torch.optim.Optimizer, rng: dict[str, torch.Tensor],
                    state: dict[str, Any]) -> Path:
    """Write `checkpoint-<step>` atomically; `save_weights(folder)` writes the model part."""
    def fill(folder: Path) -> None:
        save_weights(folder)
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        save_file({k: v.contiguous() for k, v in rng.items()}, str(folder / "rng.safetensors"))
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2, ensure_ascii=False), encoding="utf-8")

    return write_atomically(output_dir / f"{PREFIX}{step}", fill)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest step first; warns about half-written ones."""
    if not output_dir.is_dir():
        return []
    for leftover in output_dir.glob(f"{TMP_PREFIX}*"):
        warnings.warn(f"{leftover}: ignoring a half-written checkpoint left by an interrupted run", stacklevel=2)
    found = [p for p in output_dir.glob(f"{PREFIX}*")
             if p.is_dir() and p.name[len(PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_checkpoint(spec: str, output_dir: Path) -> Path:
    """`latest` -> the newest checkpoint in output_dir; otherwise the folder given."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise NCALError(f"--resume_from_checkpoint latest: {output_dir} holds no complete checkpoint")
        return found[-1]
    folder = Path(spec)
    if not (folder / STATE_FILE).is_file():
        raise NCALError(f"--resume_from_checkpoint {spec}: not a checkpoint folder (no {STATE_FILE})")
    return folder


def read_state(folder: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint."""
    path = folder / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise NCALError(f"{path}: unreadable trainer state: {err}") from None


def read_optimizer_state(folder: Path) -> dict[str, Any]:
    """optimizer.pt, refusing anything but tensors and plain containers (no code runs from it)."""
    path = folder / "optimizer.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise NCALError(f"{path}: missing from the checkpoint") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NCALError(f"{path}: refused: not a plain tensor file ({first})") from None


def read_rng(folder: Path) -> dict[str, torch.Tensor]:
    """rng.safetensors of a checkpoint."""
    path = folder / "rng.safetensors"
    try:
        return load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise NCALError(f"{path}: unreadable RNG state: {err}") from None


def prune_checkpoints(output_dir: Path, keep: int, protect: Path | None) -> None:
    """Delete the oldest checkpoints in output_dir beyond `keep`, never `protect` (the best so far)."""
    found = list_checkpoints(output_dir)
    for folder in found[:-keep] if keep else found:
        if protect is None or folder.resolve() != protect.resolve():
            shutil.rmtree(folder)
