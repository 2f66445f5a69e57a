"""The run record: what training writes is what infer, analyze and reproduce read; a foreign file is refused."""

from __future__ import annotations

import json

import pytest

from ncal_core.errors import NCALError
from ncal_core.run_record import RUN_FILE, RunRecord


def test_written_and_read_back_unchanged(tmp_path):
    record = RunRecord(config={"seed": 3, "pooling": "mean"}, labels=["a", "b"], label_counts=[5, 1],
                       base_model="/models/base", use_lora=True, learning_rate=2e-4)
    record.write(tmp_path)
    assert RunRecord.read(tmp_path) == record
    assert record.setting("seed", 0) == 3 and record.setting("not_recorded", "x") == "x"
    assert [p.name for p in tmp_path.iterdir()] == [RUN_FILE]  # no temporary file left beside it


def test_a_folder_without_one_has_none(tmp_path):
    assert RunRecord.read(tmp_path) is None


@pytest.mark.parametrize("text, message", [
    ("{", "not a readable run record"),
    ("[]", "not a run record of ncal_core.train"),
    (json.dumps({"seed": 1}), "not a run record of ncal_core.train"),  # flags without the record around them
    (json.dumps({"config": {}, "extra": 1}), "not a run record of ncal_core.train"),
])
def test_a_file_that_is_not_a_record_is_refused_in_one_line(tmp_path, text, message):
    (tmp_path / RUN_FILE).write_text(text, encoding="utf-8")
    with pytest.raises(NCALError, match=message) as err:
        RunRecord.read(tmp_path)
    assert str(tmp_path / RUN_FILE) in str(err.value) and "\n" not in str(err.value)
