"""bench/gpu_check.py without a GPU: it runs nothing and writes nothing; its record, MFU and parsing functions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import bench_train, gpu_check, memory_model

REPO = Path(__file__).resolve().parents[1]


def test_without_cuda_it_says_so_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "record.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out), "--workdir",
                           str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == ["gpu_check: no CUDA GPU here; nothing was run and nothing written."]
    assert list(tmp_path.iterdir()) == []


def test_bad_steps_are_refused():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", str(gpu_check.WARMUP_STEPS)])


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA H100 PCIe", None),
                                        ("NVIDIA GeForce RTX 4090", None)])
def test_bf16_peak_by_device_name(name, peak):
    assert gpu_check.peak_bf16_tflops(name) == peak


def test_mfu_is_model_flops_over_the_peak():
    assert gpu_check.mfu(494.5e12, 989.0) == pytest.approx(0.5)
    assert gpu_check.mfu(31.2e12, 312.0) == pytest.approx(0.1)
    assert gpu_check.mfu(1e12, None) is None


def _record(gpu_check, **fns):
    record = gpu_check.new_record({"device": "test", "torch": "t", "triton": "tr", "cuda": "c"})
    for name, fn in fns.items():
        gpu_check.add_part(record, name, gpu_check.run_part(fn))
    return record


def _boom():
    return 1 / 0


def test_a_raising_part_is_recorded_with_its_traceback_and_the_others_still_run():
    record = _record(gpu_check, first=lambda: {"x": 1}, broken=_boom, last=lambda: {"y": 2})
    parts = record["parts"]
    assert [parts[n]["status"] for n in ("first", "broken", "last")] == ["passed", "failed", "passed"]
    assert "ZeroDivisionError" in parts["broken"]["error"] and "_boom" in parts["broken"]["error"]
    assert parts["last"]["result"] == {"y": 2} and record["passed"] is False


def test_a_part_reporting_a_failed_check_fails_the_record():
    record = _record(gpu_check, ok=lambda: {"x": 1}, check=lambda: {"passed": False, "diff": 0.5})
    assert record["parts"]["check"]["status"] == "failed" and record["parts"]["check"]["error"] is None
    assert record["passed"] is False


def test_skipped_parts_do_not_fail_the_record_but_nothing_passed_is_not_a_pass():
    def skip():
        raise gpu_check.SkipPart("1 CUDA device here")

    record = _record(gpu_check, ok=lambda: {"passed": True}, skipped=skip)
    assert record["passed"] is True and record["parts"]["skipped"] == {
        "status": "skipped", "result": None, "error": None, "reason": "1 CUDA device here",
        "seconds": record["parts"]["skipped"]["seconds"]}
    assert _record(gpu_check, skipped=skip)["passed"] is False


def test_the_record_has_its_schema_and_is_written_as_json(tmp_path):
    record = _record(gpu_check, ok=lambda: {"rate": 1.5})
    path = tmp_path / "sub" / "r.json"
    gpu_check.write_record(path, record)
    back = json.loads(path.read_text())
    assert {"device", "torch", "triton", "cuda", "started", "complete", "passed", "parts"} <= set(back)
    assert set(back["parts"]["ok"]) == {"status", "result", "error", "seconds"}


def test_pytest_counts_from_a_junit_report():
    xml = ('<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" '
           'tests="20" time="1.0"></testsuite></testsuites>')
    assert gpu_check.pytest_counts(xml) == {"passed": 14, "failed": 2, "errors": 1, "skipped": 3}


def test_assets_come_from_the_flag_else_the_first_candidate_holding_them(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    second.mkdir()
    (second / "tokenizer.json").write_text("{}")
    assert gpu_check.find_asset(None, [first, second], "tokenizer.json") == second
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in .*a$|no tokenizer.json in .*a \\("):
        gpu_check.find_asset(first, [second], "tokenizer.json")


def test_the_interpreter_flag_is_dropped_for_subprocesses(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET" not in gpu_check.without_interpreter()


def test_predicted_peak_is_memory_models_total_at_the_widest_step():
    plan = [{"rows": 4, "tokens": 200, "targets": 8}, {"rows": 4, "tokens": 402, "targets": 12}]
    a = gpu_check.arch()
    assert (a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.num_key_value_heads, a.intermediate_size,
            a.vocab_size, a.tie_word_embeddings) == (896, 24, 14, 2, 4864, 151936, True)
    got = gpu_check.predicted_peak(plan, a, checkpointing=True)
    assert got["predicted_at"] == {"batch": 4, "seq": 101}
    assert got["predicted_bytes"] == memory_model.memory(a, 4, 101, 8, 3)["total_label_only_checkpointed"]


def test_throughput_counts_model_flops_at_qwen25_05b_shapes_as_a_hand_computation(tmp_path):
    steps = 2 * gpu_check.WARMUP_STEPS
    lines = [{"step": i + 1, "loss": 2.0 - i / steps, "samples_per_s": 4.0, "seconds": 0.5, "rows": 2, "tokens": 100,
              "sq_tokens": 5000, "target_tokens": 4, "padded_tokens": 100, "attended": 5000} for i in range(steps)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    a = gpu_check.arch()
    got = gpu_check.throughput(bench_train.logged_steps(tmp_path / "metrics.jsonl"), a, 989.0)
    H, L, I, r, D = 896, 24, 4864, 8, 64
    qkv = H * 14 * D + 2 * H * 2 * D
    lora = r * (H + 14 * D) + 2 * r * (H + 2 * D) + r * (14 * D + H)
    per_token = L * (4 * (qkv + 14 * D * H + 3 * H * I) + 6 * lora)  # frozen weights 4 FLOPs a weight, LoRA's 6
    flops = per_token * 100 + 12 * L * 14 * D * 5000 + 4 * H * 151936 * 4  # one step, 0.5 s
    assert got["samples_per_s"] == pytest.approx(4.0) and got["real_tokens_per_s"] == pytest.approx(200.0)
    assert got["mfu"] == pytest.approx(flops / 0.5 / 989e12)
    assert got["losses_finite"] and math.isclose(got["first_loss"], 2.0)


def test_the_scale_steps_run_bench_scale_check_on_the_gpu_at_qwen25_05b_shapes(tmp_path):
    cmd = gpu_check.scale_check_command(["lora:2", "full:2"], tmp_path / "s.json")
    assert cmd[1:3] == ["-m", "bench.scale_check"]
    flags = cmd[3:]
    assert flags[flags.index("--device") + 1] == "cuda" and flags[flags.index("--layers") + 1] == "24"
    assert flags[flags.index("--runs") + 1: flags.index("--runs") + 3] == ["lora:2", "full:2"]
    help_text = subprocess.run(cmd[:3] + ["--help"], cwd=gpu_check.REPO, capture_output=True, text=True,
                               timeout=60).stdout
    assert all(flag in help_text for flag in flags if flag.startswith("--"))


def test_the_fsdp_step_is_skipped_with_one_gpu_and_the_scale_steps_pass_only_within_tolerance(tmp_path,
                                                                                                monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "device_count", lambda: 1)
    run = gpu_check.Run(gpu_check.parse_args(["--workdir", str(tmp_path)]), tmp_path, None)
    with pytest.raises(gpu_check.SkipPart, match="the FSDP2 step needs 2"):
        run.fsdp_2proc_step()

    def fake_run(cmd, **kwargs):
        out = Path(cmd[cmd.index("--json") + 1])
        rows = [{"method": "qlora", "processes": 1, "measured_over_predicted": {"weights": ratio, "grads_and_adamw": 1}}]
        out.write_text(json.dumps({"rows": rows}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    for ratio, passed in ((1.05, True), (0.85, False)):
        assert run.qlora_step()["passed"] is passed
