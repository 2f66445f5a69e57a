"""The training state: where a run is, what the development split chose, what a resume must keep.

The loop advances it, the metrics log counts its lines in it, and every checkpoint writes it as
trainer_state.json, which a resume reads back into the same dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, get_args, get_origin, get_type_hints

from ncal_core.errors import NCALError


@dataclass
class TrainState:
    """trainer_state.json of a checkpoint, and the loop's position between checkpoints."""

    step: int = 0                         # optimizer steps done
    epoch: int = 0                        # epochs finished
    micro_batch: int = 0                  # global micro-batches of the current epoch done
    best_macro_f1: float | None = None    # the development split's best weighted macro-F1 so far
    best_checkpoint: str | None = None    # the folder holding those weights
    log_lines: int = 0                    # lines of metrics.jsonl written: a resume truncates the log to them
    run: dict[str, Any] | None = None     # resume.resume_settings of the run (None: saved before they were kept)
    scheduler: dict[str, Any] | None = None  # the learning-rate schedule's state_dict, taken at a checkpoint
    scaler: dict[str, Any] | None = None  # the fp16 loss scaler's state_dict, taken at a checkpoint (fp16 only)

    @classmethod
    def from_json(cls, data: Any, path: Path) -> TrainState:
        """The state read from `path` (trainer_state.json), refused in one line when it is not one of ours."""
        kinds = {name: _json_kinds(hint) for name, hint in get_type_hints(cls).items()}
        # a Hugging Face Trainer checkpoint (the reference code's) has a trainer_state.json of another shape
        for key in ("step", "epoch", "micro_batch", "scheduler"):
            if not isinstance(data, dict) or not isinstance(data.get(key), kinds[key][0]):
                raise NCALError(f"{path}: not a checkpoint of ncal_core.train (no {kinds[key][0].__name__} {key!r})")
        for key, value in data.items():
            if key not in kinds:
                raise NCALError(f"{path}: unknown trainer state field {key!r} (known: {', '.join(kinds)})")
            if not isinstance(value, kinds[key]) or isinstance(value, bool):
                raise NCALError(f"{path}: trainer state field {key!r} is {value!r}; expected {kinds[key][0].__name__}")
        return cls(**data)


def _json_kinds(hint: Any) -> tuple[type, ...]:
    """The classes a field's JSON value may have: `dict[str, Any] | None` -> (dict, NoneType)."""
    return tuple(get_origin(arg) or arg for arg in (get_args(hint) if isinstance(hint, UnionType) else (hint,)))
