"""Shared test fixtures: where the shared data, Qwen's real tokenizer and the real pretrained checkpoint are,
skipping clearly when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from real_model import missing_files, real_model_path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NCAL_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    """Qwen3's real tokenizer and chat template (../shared/tokenizers/qwen3)."""
    path = SHARED / "tokenizers" / "qwen3"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"Qwen's real tokenizer is not at {path} (set NCAL_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def tmwpl_dir() -> Path:
    """The folder holding TMWPL_train.jsonl and TMWPL_test.jsonl (../shared/data)."""
    path = SHARED / "data"
    if not (path / "TMWPL_train.jsonl").is_file():
        pytest.skip(f"TMWPL is not at {path} (set NCAL_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The real pretrained Qwen2.5-Coder-0.5B-Instruct folder ($NCAL_REAL_MODEL, else the build script's default).

    Absent, the tests that need it skip saying why; with NCAL_REAL_MODEL_REQUIRED=1 (set by .ci/run when it was
    to build the folder) they fail instead, so that a build that failed is not read as a pass.
    """
    path = real_model_path()
    missing = missing_files(path)
    if missing:
        why = (f"the real checkpoint is not at {path} (no {', '.join(missing)}): build it with "
               "python ../shared/models/build_qwen_coder.py, or set NCAL_REAL_MODEL to its folder")
        if os.environ.get("NCAL_REAL_MODEL_REQUIRED") == "1":
            pytest.fail(f"NCAL_REAL_MODEL_REQUIRED=1 but {why}")
        pytest.skip(why)
    return path
