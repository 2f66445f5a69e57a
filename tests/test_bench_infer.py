"""bench/bench_infer.py: its row choice and flags, and --quick end to end (no timing asserted)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench_infer(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("bench_infer")


def test_a_row_subset_spreads_over_the_class_sorted_test_file(bench_infer):
    assert bench_infer.spaced(350, 7) == [0, 50, 100, 150, 200, 250, 300]
    assert bench_infer.spaced(350, 350) == list(range(350))


def test_the_one_prompt_at_a_time_side_is_capped_for_qwen25_only_and_quick_trains_its_own_model(bench_infer):
    qwen = bench_infer.parse_args(["--model", "Qwen2.5-0.5B"])
    assert (qwen.rows, qwen.single_rows, qwen.threads) == (None, 50, min(2, os.cpu_count() or 1))
    assert bench_infer.parse_args([]).single_rows is None
    quick = bench_infer.parse_args(["--quick"])
    assert (quick.rows, quick.single_rows, quick.threads) == (30, None, 1)
    for refused in (["--quick", "--model", "Qwen2.5-0.5B"], ["--quick", "--model_path", "run"],
                    ["--model", "Qwen2.5-0.5B", "--model_path", "run"]):
        with pytest.raises(SystemExit):
            bench_infer.parse_args(refused)


@pytest.mark.slow
def test_quick_benchmark_runs_the_three_sides_on_the_same_rows_and_writes_the_report(tmp_path, tmwpl_dir):
    # A tiny model of 20 steps, 30 rows on 1 thread: about 20 s on this 2-core machine. Timings are never asserted.
    out = subprocess.run([sys.executable, str(BENCH / "bench_infer.py"), "--quick", "--json", str(tmp_path / "b.json")],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "NCAL_DATA_DIR": str(tmwpl_dir)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "b.json").read_text())
    assert (report["mode"], report["rows"], report["single_rows"]) == ("quick", 30, 30)
    assert [side["side"] for side in report["sides"]] == ["ours", "generate_batched", "generate_single"]
    for side in report["sides"]:
        assert side["rows"] == 30
        assert side["prompts_per_s"] > 0 and side["peak_rss_mb"] > 0
        assert 0 <= side["macro_f1"] <= 1 and 0 <= side["no_label"] <= 30
    assert report["sides"][0]["no_label"] == 0  # scoring always picks a label
    assert [c["baseline"] for c in report["comparisons"]] == ["generate_batched", "generate_single"]
    assert all(c["prompts_per_s_ratio"] > 0 for c in report["comparisons"])
    assert "Ours / baseline" in out.stdout and "as the reference's inference.py runs" in out.stdout
