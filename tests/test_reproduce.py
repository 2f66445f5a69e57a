"""bench/reproduce.py --quick runs the whole comparison path end to end (it asserts nothing about who wins), and
reuses a finished run only while it was trained with the settings its method gives now."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_reproduce_writes_the_table_json_and_plot(tmp_path, tmwpl_dir):
    env = {**os.environ, "NCAL_CACHE_DIR": str(tmp_path / "cache"), "NCAL_DATA_DIR": str(tmwpl_dir),
           "OMP_NUM_THREADS": "1"}

    def reproduce() -> str:
        return subprocess.run([sys.executable, str(REPO / "bench" / "reproduce.py"), "--quick", "--out",
                               str(tmp_path / "out")], check=True, env=env, capture_output=True, cwd=REPO,
                              text=True).stdout

    reproduce()
    record = tmp_path / "out" / "runs" / "sft-s0" / "ncal_run.json"
    trained = record.stat().st_mtime_ns
    assert "training again" not in reproduce() and record.stat().st_mtime_ns == trained  # finished runs are reused
    recorded = json.loads(record.read_text())
    recorded["config"]["la_loss_tau"] = 1.0  # as if trained before a default changed
    record.write_text(json.dumps(recorded))
    assert "sft-s0: trained with other settings, training again: la_loss_tau 1.0 -> 0.0" in reproduce()
    assert json.loads(record.read_text())["config"]["la_loss_tau"] == 0.0
    rows = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert [r["method"] for r in rows] == ["sft", "sft+LA", "ncal", "ncal+LA"]
    for row in rows:
        assert 0 <= row["macro_f1_mean"] <= 1 and 0 <= row["dev_macro_f1_mean"] <= 1 and len(row["tail_f1"]) == 3
    assert "delta_vs_sft" in rows[2]
    table = (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    assert table.count("\n") == 2 + len(rows)
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 0
