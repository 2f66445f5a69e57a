"""The record a run leaves beside its weights (ncal_run.json): one schema, one writer, one reader.

Training writes it at the start (the flags alone: the folder is then recognisably a run's) and again beside
every checkpoint and the final weights (with the labels, their training counts and the base model). infer,
analyze and bench/reproduce read it to score as the run's own evaluation did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ncal_core.durable import read_json, write_json
from ncal_core.errors import NCALError

RUN_FILE = "ncal_run.json"


@dataclass
class RunRecord:
    """What a training run of ours knew."""

    config: dict[str, Any]                 # every flag of the run, by name (a TrainConfig as a dict)
    labels: list[str] | None = None        # the classes in order; None in the record written before the data is read
    label_counts: list[int] | None = None  # training rows per class, in the order of labels
    base_model: str | None = None          # the base checkpoint's absolute path
    use_lora: bool | None = None
    learning_rate: float | None = None     # the peak learning rate the run used (the flag or its default)
    logit_adjust_tau: float | None = None  # the post-hoc tau its evaluation used: the flag, or chosen on the dev split

    def setting(self, name: str, default: Any) -> Any:
        """A flag of the run; `default` for one it does not record (a run of an older version)."""
        return self.config.get(name, default)

    def write(self, folder: Path) -> None:
        write_json(folder / RUN_FILE, asdict(self))

    @classmethod
    def read(cls, folder: Path) -> RunRecord | None:
        """The record in `folder`, None when there is none; a file that is not one is refused in one line."""
        path = folder / RUN_FILE
        if not path.is_file():
            return None
        data = read_json(path, "run record of ncal_core.train")
        known = {f.name for f in fields(cls)}
        if not isinstance(data.get("config"), dict) or set(data) - known:
            raise NCALError(f"{path}: not a run record of ncal_core.train (expected the fields {sorted(known)})")
        return cls(**data)
