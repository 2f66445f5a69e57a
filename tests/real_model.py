"""Where the real pretrained checkpoint (Qwen2.5-Coder-0.5B-Instruct, built by ../shared/models/build_qwen_coder.py)
is, and whether it is complete. The tests read it; so does .ci/run (`python tests/real_model.py`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT = Path.home() / ".cache" / "ncal-real" / "qwen2.5-coder-0.5b-instruct"
# the build writes the weights first and generation_config.json last: all four mean the build finished
FILES = ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json")


def real_model_path() -> Path:
    """$NCAL_REAL_MODEL, else the folder the build script writes by default."""
    return Path(os.environ.get("NCAL_REAL_MODEL") or DEFAULT)


def missing_files(path: Path) -> list[str]:
    """The files of a finished build that `path` lacks."""
    return [name for name in FILES if not (path / name).is_file()]


if __name__ == "__main__":
    # prints the folder; exit status 0 when the build there is complete, 1 when not
    print(real_model_path())
    sys.exit(1 if missing_files(real_model_path()) else 0)
