"""bench/memory_model.py against a hand computation, bench/bench_train.py's run plans, and bench_train.py --quick end
to end (no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_runs import TINY, command_env, run, tmwpl_rows, write_jsonl

from bench import bench_train
from bench.paper_code import differenced_rate, differenced_runs, write_slow_tokenizer_files
from ncal_core.model.qwen import ModelConfig

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m bench.<script> args` from the repository root."""
    return subprocess.run([sys.executable, "-m", f"bench.{script}", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)


def test_memory_model_matches_a_hand_computation_for_qwen25_05b_at_batch_8_by_512(tmp_path):
    out = _run("memory_model", "--batch", "8", "--seq", "512", "--json", str(tmp_path / "m.json"), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "computed, not measured" in out.stdout
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["computed_not_measured"] is True
    rows = {row["model"]: row for row in report["rows"]}
    small, big = rows["Qwen2.5-0.5B"], rows["Qwen2.5-7B"]

    # Qwen2.5-0.5B: H 896, 24 layers, 14 heads of 64, 2 KV heads, MLP 4864, vocab 151936, tied head.
    per_layer = (896 * 896 + 896) + 2 * (896 * 128 + 128) + 896 * 896 + 3 * 896 * 4864 + 2 * 896
    assert small["parameters"] == 151936 * 896 + 24 * per_layer + 896 == 494_032_768  # the published 0.49B
    assert big["parameters"] == 7_615_616_512  # the published 7.61B (untied head)
    assert rows["Qwen2.5-1.5B"]["parameters"] == 1_543_714_304  # the published 1.54B (tied head)
    assert small["weights_bf16"] == 2 * 494_032_768
    lora = 24 * 8 * ((896 + 896) + 2 * (896 + 128) + (896 + 896))
    assert small["lora_parameters"] == lora == 1_081_344
    assert small["lora_and_adamw_fp32"] == 16 * lora
    assert small["full_logits_and_grad"] == 8 * 512 * 151936 * 4 * 2
    assert small["label_only_logits_and_grad"] == 8 * 3 * 151936 * 4 * 2
    # per layer and token: 2 bytes x (7H + (2*14 + 2*2)*64 + 3*4864 + 4*8) + 4H mask bytes + 4*14 lse + 8 rstd
    layer = 8 * 512 * (2 * (7 * 896 + 32 * 64 + 3 * 4864 + 32) + 4 * 896 + 4 * 14 + 8)
    assert small["activations"] == 24 * layer
    assert small["activations_checkpointed"] == 24 * 8 * 512 * 2 * 896 + layer
    assert small["total_full_logits"] == 2 * 494_032_768 + 16 * lora + 24 * layer + 8 * 512 * 151936 * 8


def test_a_qwen25_model_plans_its_architecture_one_short_run_at_batch_8_and_no_levers_unless_asked():
    plan = bench_train.resolve_plan(bench_train.parse_args(["--model", "Qwen2.5-0.5B"]))
    a = plan.arch
    assert (a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
            a.intermediate_size, a.vocab_size, a.tie_word_embeddings) == (896, 24, 14, 2, 64, 4864, 151936, True)
    assert plan.runs == {("qwen", 8): (8, 2)}
    assert (plan.repeats, plan.levers, plan.dtype, plan.row_limit) == (1, False, "float32", None)
    assert plan.threads == min(2, os.cpu_count() or 1)

    asked = bench_train.resolve_plan(bench_train.parse_args(["--model", "Qwen2.5-1.5B", "--dtype", "bfloat16",
                                                             "--levers"]))
    a = asked.arch
    assert (a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
            a.intermediate_size, a.vocab_size, a.tie_word_embeddings) == (1536, 28, 12, 2, 128, 8960, 151936, True)
    assert asked.runs == plan.runs and asked.levers and asked.dtype == "bfloat16"
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--model", "Qwen2.5-0.5B", "--quick"])


def test_the_bench_model_keeps_its_full_and_quick_plans():
    full = bench_train.resolve_plan(bench_train.parse_args([]))
    a = full.arch
    assert (a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.num_key_value_heads, a.intermediate_size,
            a.tie_word_embeddings) == (256, 4, 4, 2, 1024, True)
    assert full.runs == {("bpe4k", 8): (60, 10), ("bpe4k", 32): (30, 5), ("qwen", 8): (30, 5), ("qwen", 32): (12, 3)}
    assert (full.repeats, full.levers, full.dtype, full.row_limit) == (2, True, "float32", None)
    quick = bench_train.resolve_plan(bench_train.parse_args(["--quick", "--levers"]))
    assert quick.runs == {("bpe4k", 8): (10, 3)}
    assert (quick.repeats, quick.levers, quick.threads, quick.row_limit) == (1, False, 1, 480)


@pytest.mark.slow
def test_quick_benchmark_runs_both_sides_and_writes_every_section_of_the_report(tmp_path, tmwpl_dir):
    # Shape bpe4k only, 10 steps of batch 8 on 1 thread: about 20 s on this 2-core machine, loaded or not.
    # Timings are never asserted.
    out = _run("bench_train", "--quick", "--json", str(tmp_path / "b.json"), "--workdir", str(tmp_path / "w"),
               timeout=900, env={"NCAL_DATA_DIR": str(tmwpl_dir)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # ours trains on every row the baseline reads: no development split held out, none scored after training
    (ours_dir,) = [d for d in (tmp_path / "w").glob("ours-*") if (d / "metrics.jsonl").exists()]
    assert not (ours_dir / "dev_ids.json").exists()
    assert not any('"eval"' in line for line in (ours_dir / "metrics.jsonl").read_text().splitlines())
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["mode"] == "quick"
    assert {"machine", "runs", "comparisons", "levers", "head_microbench", "memory_model"} <= set(report)
    assert {"mfu_denominator_gflops", "matmul_gflops_before", "matmul_gflops_after", "loadavg"} <= set(report["machine"])
    assert sorted(side["side"] for side in report["runs"]) == ["baseline", "ours"]
    for side in report["runs"]:
        assert {"samples_per_s", "real_tokens_per_s", "peak_rss_mb", "model_gflops_per_step", "mfu",
                "stalled_steps"} <= set(side)
        assert side["peak_rss_mb"] > 0 and side["samples_per_s"] > 0
    (comparison,) = report["comparisons"]
    assert {"samples_ratio", "real_tokens_ratio", "rss_ratio", "targets_met"} <= set(comparison)
    assert report["head_microbench"][0]["vocab"] == 4096
    assert report["memory_model"]["computed_not_measured"] is True
    assert "Ours / baseline" in out.stdout and "computed, not measured" in out.stdout


def test_the_benchmark_counts_a_training_runs_model_flops_as_the_runs_own_log_does(tmp_path):
    # one FLOP model: bench_train's model FLOPs of each logged step, over its seconds, are the step line's
    # model_tflops_per_s to the last bit, so the MFU of a benchmark and of a training log cannot disagree
    rows = write_jsonl(tmp_path / "train.jsonl", tmwpl_rows(24))
    out = tmp_path / "run"
    proc = run("ncal_core.train", [*TINY, "--dataset_path", rows, "--eval_dataset_path", "none", "--output_dir", out,
                                   "--use_lora", "true", "--lora_r", bench_train.LORA_R, "--target_modules",
                                   ",".join(bench_train.LORA_TARGETS), "--per_device_train_batch_size", "4",
                                   "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no"],
               command_env(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = Path(json.loads((out / "ncal_run.json").read_text())["base_model"])
    flops = bench_train.flop_model(ModelConfig.from_hf(json.loads((base / "config.json").read_text()), str(base)))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = bench_train.logged_steps(out / "metrics.jsonl")
    assert len(steps) == len(lines) == 3
    for step, line in zip(steps, lines):
        assert bench_train.model_flops(step, flops) / step["seconds"] / 1e12 == line["model_tflops_per_s"]


def test_memory_profile_records_every_phase_of_a_real_training_run(tmp_path, tmwpl_dir, qwen3_tokenizer_dir):
    # the bench model (hidden 256, 4 layers, Qwen's vocabulary), 2 steps: about 30 s; no figure is asserted but
    # what the phases must add up to
    out = _run("memory_profile", "--model", "bench", "--steps", "2", "--json", str(tmp_path / "m.json"),
               timeout=900, env={"NCAL_DATA_DIR": str(tmwpl_dir), "NCAL_SHARED_DIR": str(qwen3_tokenizer_dir.parents[1])})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = json.loads((tmp_path / "m.json").read_text())["runs"]
    probe, summary = run["probe"], run["summary"]
    assert [row["phase"].split(" (")[0] for row in run["phases"]][:3] == ["imports", "load weights", "rest of setup"]
    assert len(probe["steps"]) == 2 and all(step["saved_activation_mb"] > 0 for step in probe["steps"])
    assert probe["weights"]["parameters"] > probe["trainable"]["parameters"] > 0
    phase_peaks = [row["peak_mb"] for row in run["phases"][:-1]]
    # each VmHWM reset also resets the mark ru_maxrss is taken from: the run's peak is the larger of the two
    assert summary["peak_rss_mb"] >= max(phase_peaks) and summary["peak_rss_mb"] >= summary["ru_maxrss_mb"] > 0
    assert summary["floor_mb"] > summary["weights_mb"] > 0


# Stands in for the paper's code/train.py: it parses the paper's argument names (its config.py dataclasses and
# transformers' TrainingArguments, through HfArgumentParser, which refuses any other), checks the dataset it is
# given, makes its output folder, holds 512 MB (more than its imports), and records what it was given.
PAPER_TRAIN_STANDIN = '''
import json, os, sys
from dataclasses import dataclass, field
from transformers import HfArgumentParser, TrainingArguments

@dataclass
class Data:
    dataset_path: str
    label_types: list[str] = field(default_factory=list)

@dataclass
class Model:
    model_name_or_path: str = ""
    torch_dtype: str = "float16"
    device_map: str = "auto"

@dataclass
class LoRA:
    use_lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1

@dataclass
class ETF:
    use_etf_loss: bool = True
    lambda_lc: float = 0.1

parser = HfArgumentParser((Data, Model, LoRA, ETF, TrainingArguments))
data, model, lora, etf, training = parser.parse_args_into_dataclasses()
rows = json.load(open(data.dataset_path, encoding="utf-8"))
assert all(set(r) == {"conversation", "label"} and r["label"] in data.label_types for r in rows)
assert all(m["role"] == "user" and m["content"] for r in rows for m in r["conversation"])
held = b"x" * (512 * 2**20)  # written, so resident
os.makedirs(training.output_dir, exist_ok=True)  # as the paper's check_arguments does
with open(training.output_dir + "/standin.json", "w") as out:
    json.dump({"argv": sys.argv[1:], "rows": len(rows), "max_steps": training.max_steps,
               "torch_dtype": model.torch_dtype,
               "lora_r": lora.lora_r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
               "lambda_lc": etf.lambda_lc, "learning_rate": training.learning_rate, "seed": training.seed,
               "use_cpu": training.use_cpu,
               "batch": training.per_device_train_batch_size, "model": model.model_name_or_path}, out)
'''


@pytest.mark.slow
def test_quick_benchmark_runs_the_papers_own_train_py_when_given_its_folder(tmp_path, tmwpl_dir,
                                                                          monkeypatch, capsys):
    """In process, the stand-in's wall times given (10 s of start-up and 0.5 s a step) rather than measured: a loaded
    machine cannot make its longer run look shorter."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text(PAPER_TRAIN_STANDIN)
    measured = bench_train.run_measured

    def given_times(cmd: list[str], log_stem: Path, threads: int, timeout: float) -> dict[str, float]:
        result = measured(cmd, log_stem, threads, timeout)
        if str(code / "train.py") in cmd:
            result["wall_s"] = 10.0 + 0.5 * int(cmd[cmd.index("--max_steps") + 1])
        return result

    monkeypatch.setattr(bench_train, "run_measured", given_times)
    monkeypatch.setenv("NCAL_DATA_DIR", str(tmwpl_dir))
    threads = torch.get_num_threads()
    try:
        assert bench_train.main(["--quick", "--reference_code", str(code), "--json", str(tmp_path / "b.json"),
                                 "--workdir", str(tmp_path / "w")]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["baseline"].startswith(f"the paper's code: {code / 'train.py'}")
    base = next(run for run in report["runs"] if run["side"] == "baseline")
    # the quick plan: 3 warm-up steps and 10 in all, batch 8, so 56 extra rows over the 3.5 extra seconds
    assert base["steps"] == 10 and base["warmup_steps"] == 3
    assert (base["wall_s"], base["wall_s_short"]) == (15.0, 11.5)
    assert base["samples_per_s"] == 16.0
    assert base["peak_rss_mb"] > 512 and base["mfu"] > 0 and base["real_tokens_per_s"] > 0
    runs = {json.loads(p.read_text())["max_steps"]: json.loads(p.read_text())
            for p in (tmp_path / "w").glob("paper-*/standin.json")}
    assert sorted(runs) == [3, 10]
    given = runs[10]
    assert (given["rows"], given["batch"], given["torch_dtype"]) == (480, 8, "float32")
    # the training ours runs, by the flag names both share
    assert {name: given[name] for name in bench_train.TRAINING} == bench_train.TRAINING
    assert given["use_cpu"] is True
    # its tokenizer loads with use_fast=False: vocab.json and merges.txt beside tokenizer.json, the same ids
    from transformers import AutoTokenizer, Qwen2Tokenizer

    folder = Path(given["model"])
    slow = Qwen2Tokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    fast = AutoTokenizer.from_pretrained(folder)
    lines = (tmwpl_dir / "TMWPL_test.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["question"] for line in lines[:100]]
    assert len(slow) == len(fast) and [slow.encode(t) for t in texts] == [fast.encode(t) for t in texts]
    assert "rss not like for like: the paper's code meets its widest batch at a random step" in out.out


def test_reference_code_without_train_py_is_refused_in_one_line(tmp_path):
    out = _run("bench_train", "--quick", "--reference_code", str(tmp_path), timeout=60)
    assert out.returncode != 0
    assert out.stderr.strip() == f"--reference_code {tmp_path}: no train.py there; give the paper's code/ folder"


def test_a_differenced_rate_discards_the_cold_first_run_and_needs_the_longer_run_to_take_longer(monkeypatch):
    assert differenced_rate({"wall_s": 10.0}, {"wall_s": 14.0}, 16, 48) == 8.0
    with pytest.raises(RuntimeError, match="must do more work and take longer"):
        differenced_rate({"wall_s": 10.0}, {"wall_s": 9.0}, 16, 48)
    # a cold first run 5 s slower than the same run warm; 0.5 s a unit plus 10 s of start-up when warm
    calls = []

    def run(n: int) -> dict[str, float]:
        calls.append(n)
        return {"wall_s": 10.0 + 0.5 * n + (5.0 if len(calls) == 1 else 0.0), "call": len(calls)}

    rate, short, long = differenced_runs(run, 2, 6)
    assert calls == [2, 6, 2] and (short["call"], long["call"]) == (3, 2)
    assert rate == 2.0  # 4 units over 2 s; the cold run would have given 4 units over -3 s


def test_the_slow_tokenizer_files_keep_those_a_model_folder_has_and_fill_in_the_missing(monkeypatch, tmp_path):
    vocab = {"a": 0, "b": 1, "ab": 2}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab,
                                                                   "merges": [["a", "b"]]}}))
    (tmp_path / "vocab.json").write_text('{"own": 0}')
    write_slow_tokenizer_files(tmp_path)
    assert (tmp_path / "vocab.json").read_text() == '{"own": 0}'
    assert (tmp_path / "merges.txt").read_text() == "#version: 0.2\na b\n"
    (tmp_path / "vocab.json").unlink()
    write_slow_tokenizer_files(tmp_path)
    assert json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8")) == vocab
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}}))
    with pytest.raises(ValueError, match="needs a BPE model, not Unigram"):
        write_slow_tokenizer_files(tmp_path)
