"""Shared test fixtures: where the shared data and Qwen's real tokenizer are, skipping clearly when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
