"""Load whatever a user points inference at into one model + tokenizer + label set.

A folder may be: a training output or checkpoint of ours (ncal_run.json beside the weights), a
PEFT adapter (ours, or one saved by the paper's reference code) over a base checkpoint, or a plain
Hugging Face checkpoint (base, merged or fully fine-tuned).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ncal_core.errors import NCALError
from ncal_core.lora import load_adapter
from ncal_core.model import QwenModel, load_model
from ncal_core.prompts import load_tokenizer
from ncal_core.run_files import RUN_FILE


@dataclass
class Predictor:
    """A model ready for scoring, with the tokenizer and what the run that made it knew."""

    model: QwenModel
    tokenizer: Any
    labels: list[str] | None      # None: the caller must supply them (a plain checkpoint or foreign adapter)
    label_counts: list[int] | None  # training rows per class, for logit adjustment
    instruction: str | None
    cutoff_len: int
    pooling: str


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise NCALError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


@dataclass
class ModelFolder:
    """A model folder checked before any weight is read."""

    path: Path
    run: dict[str, Any]  # what its training run recorded (labels, label_counts, config); {} for a foreign model
    base: Path | None    # the base checkpoint under an adapter; None for a full checkpoint


def open_model_folder(model_path: str | Path, base_model_path: str | Path | None = None) -> ModelFolder:
    """What `model_path` is (adapter or full checkpoint), the base an adapter needs, and its run's record."""
    path = Path(model_path)
    if not path.is_dir():
        raise NCALError(f"--model_path {model_path}: not a folder")
    run = _read_json(path / RUN_FILE) if (path / RUN_FILE).is_file() else {}
    if (path / "adapter_config.json").is_file():
        base = base_model_path or run.get("base_model") \
            or _read_json(path / "adapter_config.json").get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise NCALError(f"{path / 'adapter_config.json'}: base_model_name_or_path: the base checkpoint "
                            f"{base!r} is not a local folder; pass --base_model_path")
        return ModelFolder(path, run, Path(base))
    if (path / "config.json").is_file():
        return ModelFolder(path, run, None)
    raise NCALError(f"--model_path {model_path}: neither a checkpoint (config.json) nor an adapter "
                    "(adapter_config.json)")


def load_predictor(model_path: str | Path, base_model_path: str | Path | None = None,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Predictor:
    """Resolve `model_path` (and the base it needs) into a Predictor in eval mode."""
    folder = open_model_folder(model_path, base_model_path)
    path, run, config = folder.path, folder.run, folder.run.get("config", {})
    if folder.base is not None:
        model = load_model(folder.base, dtype=dtype, device=device)
        load_adapter(model, path)
    else:
        model = load_model(path, dtype=dtype, device=device)
    tokenizer_dir = path if (path / "tokenizer_config.json").is_file() else folder.base or path
    model.eval()
    return Predictor(model=model, tokenizer=load_tokenizer(tokenizer_dir), labels=run.get("labels"),
                     label_counts=run.get("label_counts"),
                     instruction=config.get("instruction"), cutoff_len=config.get("cutoff_len", 2048),
                     pooling=config.get("pooling", "last"))
