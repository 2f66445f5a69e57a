"""Atomic writes: the new content or the old, never a half-written file or a temporary one left behind."""

from __future__ import annotations

import pytest

from ncal_core.durable import CACHE_DIR_ENV, add_files, atomic_file, cache_root, write_atomically, write_text


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
