"""Checkpoints written atomically and read back without executing anything from them.

A checkpoint is a folder `checkpoint-<step>` holding the trainable weights (a PEFT adapter or a
full Hugging Face checkpoint), `optimizer.pt` (tensors only; read with weights_only=True; a sharded
run's `optimizer/`, torch.distributed.checkpoint's files),
`rng.safetensors` and `trainer_state.json`. It is written into a hidden temporary folder, every
file fsynced, then renamed into place, so a crash leaves either the old set or the new one; a
temporary folder left by a crash is ignored with a warning.
"""

from __future__ import annotations

import pickle
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ncal_core.durable import TMP_PREFIX, read_json, write_atomically, write_json
from ncal_core.errors import NCALError
from ncal_core.train.state import TrainState

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"

_WARNED: set[Path] = set()  # half-written checkpoints already reported by this process


def save_checkpoint(output_dir: Path, *, save_weights: Callable[[Path], None],
                    save_optimizer: Callable[[Path], None], rng: dict[str, torch.Tensor],
                    state: TrainState) -> Path:
    """Write `checkpoint-<state.step>` atomically; `save_weights(folder)` writes the model part,
    `save_optimizer(folder)` the optimizer state (optimizer.pt, or a sharded run's optimizer/ folder)."""
    def fill(folder: Path) -> None:
        save_weights(folder)
        save_optimizer(folder)
        save_file({k: v.contiguous() for k, v in rng.items()}, str(folder / "rng.safetensors"))
        write_json(folder / STATE_FILE, asdict(state))

    return write_atomically(output_dir / f"{PREFIX}{state.step}", fill)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest step first; warns about half-written ones."""
    if not output_dir.is_dir():
        return []
    for leftover in output_dir.glob(f"{TMP_PREFIX}*"):
        if leftover not in _WARNED:
            _WARNED.add(leftover)
            print(f"warning: {leftover}: ignoring a half-written checkpoint left by an interrupted run",
                  file=sys.stderr)
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


def read_state(folder: Path) -> TrainState:
    """trainer_state.json of a checkpoint."""
    path = folder / STATE_FILE
    return TrainState.from_json(read_json(path, "trainer state"), path)


def read_optimizer_state(folder: Path) -> dict[str, Any]:
    """optimizer.pt, refusing anything but tensors and plain containers (no code runs from it)."""
    path = folder / "optimizer.pt"
    try:
        with warnings.catch_warnings():
            # torch's advice to report an unusual pickle protocol: noise when the file is refused anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise NCALError(f"{path}: missing from the checkpoint") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        # torch wraps the reason in paragraphs of advice (among it: load with weights_only=False); keep the reason
        paragraphs = [p for p in re.split(r"\n\s*\n", str(err).strip()) if p.strip()] or [type(err).__name__]
        reason = next((p for p in paragraphs if not p.startswith(("Weights only load failed", "Check the docum"))),
                      paragraphs[0])
        reason = " ".join(reason.split())
        raise NCALError(f"{path}: refused: not a plain tensor file ({reason})") from None


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
        # a symlink is the user's (this code never makes one), and what it points to is not ours to delete
        if not folder.is_symlink() and (protect is None or folder.resolve() != protect.resolve()):
            shutil.rmtree(folder)
