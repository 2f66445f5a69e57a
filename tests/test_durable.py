"""Atomic writes: the new content or the old, never a half-written file or a temporary one left behind."""

from __future__ import annotations

import pytest

from ncal_core.durable import (
    CACHE_DIR_ENV,
    add_files,
    atomic_file,
    cache_root,
    read_json,
    write_atomically,
    write_json,
    write_text,
)
from ncal_core.errors import NCALError


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "f.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as out:
            out.write(b"half of the ne")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    write_text(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_a_folder_is_replaced_whole_and_files_are_added_beside_others(tmp_path):
    folder = tmp_path / "ckpt"
    write_atomically(folder, lambda d: (d / "a").write_text("1"))
    write_atomically(folder, lambda d: (d / "b").write_text("2"))
    assert sorted(p.name for p in folder.iterdir()) == ["b"]
    kept = write_atomically(folder, lambda d: (d / "c").write_text("3"), replace=False)
    assert kept == folder and sorted(p.name for p in folder.iterdir()) == ["b"]
    add_files(folder, lambda d: (d / "c").write_text("3"))
    assert sorted(p.name for p in folder.iterdir()) == ["b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_the_cache_root_is_the_variable_when_set_and_not_empty(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.setenv(CACHE_DIR_ENV, "")
    assert cache_root().name == "ncal" and cache_root().is_absolute()


def test_json_is_written_atomically_and_read_back_unescaped(tmp_path):
    path = tmp_path / "eval.json"
    write_json(path, {"labels": ["回忆", "识别"], "macro_f1": 0.5})
    assert path.read_text(encoding="utf-8") == '{\n  "labels": [\n    "回忆",\n    "识别"\n  ],\n  "macro_f1": 0.5\n}\n'
    assert read_json(path) == {"labels": ["回忆", "识别"], "macro_f1": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


@pytest.mark.parametrize("content, message", [
    (None, "f.json: file not found"),
    ('{"step": 2, "epo', "f.json: not a readable trainer state (not valid JSON: Unterminated string starting at: "
                        "line 1 column 13 (char 12))"),
    (b"\xff\xfe", "f.json: not a readable trainer state ("),
    ("[1, 2]", "f.json: not a trainer state: expected a JSON object, got list"),
])
def test_a_missing_or_malformed_json_file_is_refused_in_one_line_naming_it(tmp_path, content, message):
    path = tmp_path / "f.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(NCALError) as err:
        read_json(path, "trainer state")
    assert str(err.value).startswith(str(tmp_path / message)) and "\n" not in str(err.value)
