"""The README documents every flag of every command, with the default the code has."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ncal_core.analyze import AnalyzeConfig
from ncal_core.export import ExportConfig
from ncal_core.infer import InferConfig
from ncal_core.serve import ServeConfig
from ncal_core.train.config import TrainConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _default_text(field: dataclasses.Field) -> str:
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if value is None:
        return "—"
    if isinstance(value, list):
        value = ",".join(value)
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


@pytest.mark.parametrize("config", [TrainConfig, InferConfig, AnalyzeConfig, ExportConfig, ServeConfig])
def test_every_flag_is_in_the_readme_with_its_default(config):
    for field in dataclasses.fields(config):
        rows = [line for line in README.splitlines() if line.startswith(f"| `--{field.name}` |")]
        assert rows, f"--{field.name} of {config.__name__} is not in README.md"
        assert any(row.split("|")[2].strip() == _default_text(field) for row in rows), (field.name, rows)
