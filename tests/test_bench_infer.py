"""bench/bench_infer.py: its row choice and flags, and --quick end to end (no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import bench_infer

REPO = Path(__file__).resolve().parents[1]


def test_a_row_subset_spreads_over_the_class_sorted_test_file():
    assert bench_infer.spaced(350, 7) == [0, 50, 100, 150, 200, 250, 300]
    assert bench_infer.spaced(350, 350) == list(range(350))


def test_the_one_prompt_at_a_time_side_is_capped_for_qwen25_only_and_quick_trains_its_own_model(tmp_path):
    (tmp_path / "inference.py").write_text("")
    qwen = bench_infer.parse_args(["--model", "Qwen2.5-0.5B"])
    assert (qwen.rows, qwen.single_rows, qwen.threads) == (None, 50, min(2, os.cpu_count() or 1))
    assert bench_infer.parse_args([]).single_rows is None
    quick = bench_infer.parse_args(["--quick"])
    assert (quick.rows, quick.single_rows, quick.threads) == (30, None, 1)
    for refused in (["--quick", "--model", "Qwen2.5-0.5B"], ["--quick", "--model_path", "run"],
                    ["--model", "Qwen2.5-0.5B", "--model_path", "run"],
                    # the paper's rate is differenced between a fifth of the rows and all of them
                    ["--reference_code", str(tmp_path), "--single_rows", "1"],
                    ["--reference_code", str(tmp_path), "--rows", "1"]):
        with pytest.raises(SystemExit):
            bench_infer.parse_args(refused)


# Stands in for the paper's code/inference.py: its argument names, one prompt a line in, {"results": [{"prompt",
# "response"}]} out; it answers "not a label" to the first prompt and 回忆 to the others, holds 256 MB and sleeps
# 0.1 s a prompt.
PAPER_INFERENCE_STANDIN = """
import argparse, json, time
parser = argparse.ArgumentParser()
for flag in ("--model_path", "--base_model_path", "--prompt", "--prompts_file", "--output_file"):
    parser.add_argument(flag)
parser.add_argument("--max_length", type=int, default=512)
parser.add_argument("--temperature", type=float, default=0.7)
parser.add_argument("--top_p", type=float, default=0.9)
args = parser.parse_args()
prompts = [line.strip() for line in open(args.prompts_file, encoding="utf-8") if line.strip()]
held = b"x" * (256 * 2**20)  # written, so resident
time.sleep(0.1 * len(prompts))
results = [{"prompt": p, "response": " not a label " if i == 0 else "回忆"} for i, p in enumerate(prompts)]
json.dump({"results": results, "parameters": {"max_length": args.max_length}}, open(args.output_file, "w"))
json.dump({"max_length": args.max_length, "model_path": args.model_path},
          open(args.prompts_file + ".args.json", "w"))
"""


@pytest.mark.slow
def test_quick_benchmark_runs_every_side_on_the_same_rows_and_writes_the_report(tmp_path, tmwpl_dir,
                                                                              monkeypatch, capsys):
    # A tiny model of 20 steps, 30 rows on 1 thread: about 20 s on this 2-core machine. Timings are never asserted.
    # The paper's inference.py is a stand-in that keeps its command line.
    # Runs in process, the stand-in's wall times given (10 s and 0.1 s a prompt) rather than measured: a loaded
    # machine cannot make its longer run look shorter.
    code = tmp_path / "code"
    code.mkdir()
    (code / "inference.py").write_text(PAPER_INFERENCE_STANDIN)
    measured = bench_infer.run_measured

    def given_times(cmd: list[str], log_stem: Path, threads: int, timeout: float) -> dict[str, float]:
        result = measured(cmd, log_stem, threads, timeout)
        if str(code / "inference.py") in cmd:
            prompts = Path(cmd[cmd.index("--prompts_file") + 1]).read_text(encoding="utf-8").splitlines()
            result["wall_s"] = 10.0 + 0.1 * len(prompts)
        return result

    monkeypatch.setattr(bench_infer, "run_measured", given_times)
    monkeypatch.setenv("NCAL_DATA_DIR", str(tmwpl_dir))
    threads = torch.get_num_threads()
    try:
        assert bench_infer.main(["--quick", "--json", str(tmp_path / "b.json"), "--workdir", str(tmp_path / "w"),
                                 "--reference_code", str(code)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    report = json.loads((tmp_path / "b.json").read_text())
    assert (report["mode"], report["rows"], report["single_rows"]) == ("quick", 30, 30)
    assert [side["side"] for side in report["sides"]] == ["ours", "generate_batched", "generate_single",
                                                          "paper_inference"]
    for side in report["sides"]:
        assert side["rows"] == 30
        assert side["prompts_per_s"] > 0 and side["peak_rss_mb"] > 0
        assert 0 <= side["macro_f1"] <= 1 and 0 <= side["no_label"] <= 30
    assert report["sides"][0]["no_label"] == 0  # scoring always picks a label
    assert [c["baseline"] for c in report["comparisons"]] == ["generate_batched", "generate_single",
                                                              "paper_inference"]
    assert all(c["prompts_per_s_ratio"] > 0 for c in report["comparisons"])
    assert "Ours / baseline" in out.out and "as the reference's inference.py runs" in out.out

    paper = report["sides"][3]
    # 6 then 30 prompts: 24 extra over the extra wall time
    assert paper["rows_short"] == 6
    assert (paper["wall_s"], paper["wall_s_short"]) == pytest.approx((13.0, 10.6))
    assert paper["prompts_per_s"] == pytest.approx(10.0)  # 24 prompts over 2.4 s
    assert paper["peak_rss_mb"] > 256 and paper["code"].startswith(str(code / "inference.py"))
    model = Path(json.loads((tmp_path / "w" / "paper-prompts-30.txt.args.json").read_text())["model_path"])
    assert (model / "vocab.json").is_file() and (model / "merges.txt").is_file()  # its use_fast=False tokenizer
    # its responses are read back in the rows' order: the first is no label, the others 回忆
    rows = [json.loads(line) for line in (tmwpl_dir / "TMWPL_test.jsonl").read_text(encoding="utf-8").splitlines()]
    gold = [rows[i]["class"] for i in bench_infer.spaced(len(rows), 30)]
    assert paper["no_label"] == 1 and paper["accuracy"] == pytest.approx(gold[1:].count("回忆") / 30)
    for n in (6, 30):
        prompts = (tmp_path / "w" / f"paper-prompts-{n}.txt").read_text(encoding="utf-8").splitlines()
        assert len(prompts) == n and all(p.strip() for p in prompts)
        given = json.loads((tmp_path / "w" / f"paper-prompts-{n}.txt.args.json").read_text())
        assert given["max_length"] == report["max_new_tokens"]


def test_reference_code_without_inference_py_is_refused_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.bench_infer", "--quick", "--reference_code", str(tmp_path)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode != 0
    assert out.stderr.strip() == f"--reference_code {tmp_path}: no inference.py there; give the paper's code/ folder"


@pytest.mark.slow
def test_quick_benchmark_times_a_head_beside_label_scoring_on_the_same_rows(tmp_path, tmwpl_dir):
    out = subprocess.run([sys.executable, "-m", "bench.bench_infer", "--quick", "--head", "--no_generate",
                          "--json", str(tmp_path / "b.json"), "--workdir", str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "NCAL_DATA_DIR": str(tmwpl_dir)}, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "b.json").read_text())
    assert [side["side"] for side in report["sides"]] == ["ours", "head"]
    assert all(side["rows"] == 30 and side["no_label"] == 0 for side in report["sides"])
    assert [(c["side"], c["baseline"]) for c in report["comparisons"]] == [("head", "ours")]
    assert json.loads((tmp_path / "w" / "head-model" / "config.json").read_text())["architectures"] == \
        ["Qwen2ForSequenceClassification"]
