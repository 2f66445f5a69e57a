"""One GPU check of the whole project, written as one JSON record: tests, kernel timings, a 0.5B-shaped run, evaluation.

    python -m bench.gpu_check [--out FILE] [--tokenizer DIR] [--data DIR] [--steps N] [--batch N] [--eval_rows N]

Sized for at most 8 minutes on one H100 / H200. Parts, each run on its own (a part that raises is recorded
with its traceback and the others still run; `passed` is true only when no part failed):

- `cuda_tests`: `pytest -m cuda` in a subprocess without TRITON_INTERPRET (tests/test_cuda.py: the compiled
  Triton kernels against the PyTorch path, and triton vs torch TC training on the tiny model).
- `kernel_timings`: bench_kernels.timing_report() (fused Triton vs eager vs torch.compile, forward + backward)
  at KERNEL_SHAPES, hidden 896 and 3584.
- `train_qwen05b`: a random Qwen2.5-0.5B-shaped model with Qwen's real tokenizer, LoRA + TC, bf16 weights,
  `--steps` steps on TMWPL train, without and with gradient checkpointing: samples/s, tokens/s, MFU against
  the GPU's dense bf16 peak, peak torch.cuda.max_memory_allocated against bench/memory_model.py.
- `train_2proc`: the same run through 2 processes (accelerate), when there are >= 2 GPUs; else skipped.
- `qlora_step`: bench/scale_check.py's QLoRA step (NF4 base) at Qwen2.5-0.5B's shapes on one GPU: the bytes of
  its weights, gradients and AdamW state within SCALE_RTOL of bench/memory_model.py's per_gpu, and its peak.
- `fsdp_2proc_step`: the same for LoRA, QLoRA and full fine-tuning sharded by FSDP2 over 2 processes (torchrun,
  NCCL), when there are >= 2 GPUs; else skipped.
- `eval_gpu_vs_cpu`: the trained adapter scored on `--eval_rows` TMWPL test rows on the GPU (fp32 and
  bf16) and on the CPU (fp32) with ncal_core.evaluation.evaluate.evaluate; macro-F1 within EVAL_TOLERANCE.

Without CUDA it says so in one line and exits 0, having run and written nothing.
Assets: Qwen's tokenizer folder and the TMWPL folder come from the flags, else from `.gpu_assets/` in the
repository (copied there for machines that get the checkout without ../shared), else from ../shared.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from ncal_core.durable import read_json, write_json
from ncal_core.train.log import peak_bf16_tflops

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent

ASSETS = REPO / ".gpu_assets"
SHARED = Path(os.environ.get("NCAL_SHARED_DIR", REPO.parent / "shared"))
TOKENIZER_DIRS = [ASSETS / "tokenizers" / "qwen3", SHARED / "tokenizers" / "qwen3"]
DATA_DIRS = [ASSETS / "data", SHARED / "data"]
DEFAULT_OUT = BENCH / "results" / "gpu_check.json"
# bench_kernels.GPU_SHAPES has 8 (H, B, T); 3 keep the part short and torch.compile (one graph per shape and
# pooling, dynamic=False) under dynamo's default limit of 8 recompiles, past which it silently runs eager.
KERNEL_SHAPES = [(896, 32, 512), (896, 128, 2048), (3584, 128, 2048)]
WARMUP_STEPS = 5  # left out of the rates: allocator growth, Triton and cuBLAS first calls
# |macro-F1(GPU) - macro-F1(CPU fp32)|: fp32 on both sides differs by summation order only (~1e-6 in the
# scores), so no prediction should flip; bf16 rounds every hidden state, which can flip a near-tied row
# (one flip in 128 rows moves macro-F1 by ~0.01).
EVAL_TOLERANCE = {"float32": 0.0, "bfloat16": 0.02}
SUBPROCESS_TIMEOUT_S = 300
# bench/scale_check.py's steps: per-GPU rows and tokens, and how far its measured bytes may stray from the model
SCALE_BATCH, SCALE_SEQ = 8, 512
SCALE_RTOL = 0.1


class SkipPart(Exception):
    """Raised by a part that cannot run here (e.g. one GPU for the 2-process run); recorded as skipped."""


# ---------------------------------------------------------------- the record

def mfu(model_flops_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOP/s as a fraction of the peak; None without a known peak."""
    return None if peak_tflops is None else model_flops_per_s / (peak_tflops * 1e12)


def run_part(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one part: its result, status (passed / failed / skipped), seconds, and the traceback if it raised.

    A part reports a failed check by returning {"passed": False, ...}; anything it raises fails it too.
    """
    start = time.perf_counter()
    entry: dict[str, Any] = {"status": "passed", "result": None, "error": None}
    try:
        entry["result"] = fn()
        if entry["result"].get("passed") is False:
            entry["status"] = "failed"
    except SkipPart as why:
        entry.update(status="skipped", reason=str(why))
    except Exception:  # noqa: BLE001 -- every failure of a part is recorded, and the next part runs
        entry.update(status="failed", error=traceback.format_exc())
    entry["seconds"] = round(time.perf_counter() - start, 2)
    return entry


def environment() -> dict[str, Any]:
    """Device name, versions, GPU count and the bf16 peak used for MFU."""
    import triton

    name = torch.cuda.get_device_name()
    return {"device": name, "gpu_count": torch.cuda.device_count(), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "peak_bf16_tflops": peak_bf16_tflops(name)}


def new_record(env: dict[str, Any]) -> dict[str, Any]:
    """The record before any part ran; `complete` turns true after the last one."""
    return {**env, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "complete": False,
            "passed": False, "parts": {}}


def add_part(record: dict[str, Any], name: str, entry: dict[str, Any]) -> None:
    """Put a part's entry in the record and recompute `passed` (no part failed, at least one passed)."""
    record["parts"][name] = entry
    statuses = [p["status"] for p in record["parts"].values()]
    record["passed"] = "failed" not in statuses and "passed" in statuses


def write_record(path: Path, record: dict[str, Any]) -> None:
    """The record as JSON, rewritten after every part so that a run cut short keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)


# ---------------------------------------------------------------- assets

def find_asset(given: Path | None, candidates: list[Path], marker: str) -> Path:
    """The folder given on the command line, else the first candidate holding `marker`; raise if none does."""
    for folder in [given] if given is not None else candidates:
        if (folder / marker).is_file():
            return folder
    tried = [given] if given is not None else candidates
    raise FileNotFoundError(f"no {marker} in {', '.join(map(str, tried))} (see bench/README.md, 'GPU check')")


# ---------------------------------------------------------------- part: the CUDA-marked tests

def pytest_counts(junit_xml: str) -> dict[str, int]:
    """passed / failed / errors / skipped summed over the testsuites of a pytest --junitxml report."""
    root = ET.fromstring(junit_xml)
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"]}


def without_interpreter() -> dict[str, str]:
    """This environment without TRITON_INTERPRET (set, it would make the kernels run interpreted)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def cuda_tests(workdir: Path) -> dict[str, Any]:
    """`pytest -m cuda` over the suite; passes when every selected test passed and none was skipped."""
    report = workdir / "cuda_tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={report}", "tests"], cwd=REPO, env=without_interpreter(),
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    counts = pytest_counts(report.read_text(encoding="utf-8")) if report.is_file() else {}
    ok = proc.returncode == 0 and counts.get("passed", 0) > 0 and counts.get("skipped", 1) == 0
    return {"passed": ok, "returncode": proc.returncode, **counts, "output_tail": proc.stdout[-3000:]}


# ---------------------------------------------------------------- part: kernel timings

def kernel_timings() -> dict[str, Any]:
    """bench_kernels.timing_report() at KERNEL_SHAPES."""
    from bench import bench_kernels

    with mock.patch.object(bench_kernels, "GPU_SHAPES", KERNEL_SHAPES):
        return {"shapes": KERNEL_SHAPES, "rows": bench_kernels.timing_report()}


# ---------------------------------------------------------------- the 0.5B-shaped runs

def arch():
    """Qwen2.5-0.5B (an ncal_core ModelConfig): hidden 896, 24 layers, 14/2 heads, MLP 4864, vocab 151936, tied."""
    from bench import memory_model

    return memory_model.QWEN25["Qwen2.5-0.5B"]


def train_flags(model: Path, data: Path, out: Path, batch: int, steps: int, checkpointing: bool) -> list[str]:
    """LoRA (bench_train.LORA_R, the rank its FLOP count assumes) on q/k/v/o + TC (Triton) on bf16 weights,
    uniform rows, one log line per step, nothing saved but the final adapter."""
    from bench import bench_train

    return ["--model_name_or_path", str(model), "--dataset_path", str(data / "TMWPL_train.jsonl"),
            "--eval_dataset_path", "none", "--save_strategy", "no", "--eval_strategy", "no",
            "--output_dir", str(out), "--overwrite_output_dir", "true", "--use_lora", "true",
            "--lora_r", str(bench_train.LORA_R),
            "--lora_alpha", "32", "--use_etf_loss", "true", "--lambda_lc", "1", "--tc_backend", "triton",
            "--torch_dtype", "bfloat16", "--per_device_train_batch_size", str(batch), "--max_steps", str(steps),
            "--logging_steps", "1", "--seed", str(bench_train.SEED), "--resample", "none", "--pooling", "last",
            "--gradient_checkpointing", str(checkpointing).lower()]


def throughput(steps: list[dict[str, Any]], a, peak_tflops: float | None) -> dict[str, Any]:
    """bench_train.rates over the logged steps after WARMUP_STEPS (the training log's FLOP model at arch a's
    shape), plus MFU."""
    from bench import bench_train

    result = bench_train.rates(steps[WARMUP_STEPS:], a, full_head=False)
    losses = [s["loss"] for s in steps]
    return {**result, "mfu": mfu(result["model_gflops_per_s"] * 1e9, peak_tflops), "first_loss": losses[0],
            "last_loss": losses[-1], "losses_finite": all(map(math.isfinite, losses))}


def predicted_peak(plan: list[dict[str, int]], a, checkpointing: bool) -> dict[str, Any]:
    """memory_model's total at the run's widest step (most tokens), as B rows of its mean length."""
    from bench import memory_model

    widest = max(plan, key=lambda s: s["tokens"])
    batch, seq = widest["rows"], math.ceil(widest["tokens"] / widest["rows"])
    terms = memory_model.memory(a, batch, seq, r=8, label_tokens=math.ceil(widest["targets"] / widest["rows"]))
    total = terms["total_label_only_checkpointed" if checkpointing else "total_label_only"]
    return {"predicted_bytes": total, "predicted_at": {"batch": batch, "seq": seq}}


def scale_check_command(runs: list[str], out: Path) -> list[str]:
    """bench/scale_check.py on the GPU at Qwen2.5-0.5B's shapes, all 24 layers, SCALE_BATCH rows of SCALE_SEQ."""
    return [sys.executable, "-m", "bench.scale_check", "--device", "cuda", "--layers", "24", "--batch",
            str(SCALE_BATCH), "--seq", str(SCALE_SEQ), "--runs", *runs, "--json", str(out)]


def scale_steps(runs: list[str], out: Path) -> dict[str, Any]:
    """The runs' measured weights, gradients and AdamW state per process against memory_model.per_gpu's terms."""
    proc = subprocess.run(scale_check_command(runs, out), cwd=REPO, env=without_interpreter(), capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_S)
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    report = read_json(out)
    ratios = [r for row in report["rows"] for r in row["measured_over_predicted"].values()]
    return {"passed": all(abs(r - 1) <= SCALE_RTOL for r in ratios), "tolerance": SCALE_RTOL, **report}


class Run:
    """What the parts share: the arguments, a work folder, and the 0.5B-shaped checkpoint built once when needed."""

    def __init__(self, args: argparse.Namespace, workdir: Path, peak_tflops: float | None):
        self.args, self.workdir, self.peak_tflops = args, workdir, peak_tflops

    @cached_property
    def tokenizer(self) -> Path:
        return find_asset(self.args.tokenizer, TOKENIZER_DIRS, "tokenizer.json")

    @cached_property
    def data(self) -> Path:
        return find_asset(self.args.data, DATA_DIRS, "TMWPL_train.jsonl")

    @cached_property
    def checkpoint(self) -> Path:
        """A random arch() in bf16 with Qwen's tokenizer, made on the GPU, where random init of 0.5B takes no time."""
        from bench import bench_train

        folder = self.workdir / "qwen05b-random"
        bench_train.copy_tokenizer(self.tokenizer, folder)
        bench_train.build_checkpoint(folder, arch(), torch.bfloat16, "cuda")
        torch.cuda.empty_cache()
        return folder

    def flags(self, tag: str, checkpointing: bool) -> list[str]:
        return train_flags(self.checkpoint, self.data, self.workdir / tag, self.args.batch, self.args.steps,
                           checkpointing)

    def train_qwen05b(self) -> dict[str, Any]:
        """In process, without then with gradient checkpointing: rates, MFU, measured vs predicted peak memory."""
        from bench import bench_train
        from ncal_core.cli import parse_config
        from ncal_core.train.config import TrainConfig
        from ncal_core.train.loop import train

        runs = {}
        for checkpointing in (False, True):
            tag = "train-ckpt" if checkpointing else "train"
            flags = self.flags(tag, checkpointing)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            train(parse_config(TrainConfig, flags, "", "python -m ncal_core.train"))
            peak = torch.cuda.max_memory_allocated()
            steps = bench_train.logged_steps(self.workdir / tag / "metrics.jsonl")
            prediction = predicted_peak(steps, arch(), checkpointing)
            runs[tag] = {**throughput(steps, arch(), self.peak_tflops),
                         "peak_allocated_bytes": peak, **prediction,
                         "measured_over_predicted": peak / prediction["predicted_bytes"]}
        return {"passed": all(r["losses_finite"] for r in runs.values()), "batch": self.args.batch,
                "steps": self.args.steps, "warmup_steps": WARMUP_STEPS, "runs": runs}

    def train_2proc(self) -> dict[str, Any]:
        """The no-checkpointing run through 2 processes (accelerate, one GPU each); rates over the global batch."""
        from bench import bench_train

        if torch.cuda.device_count() < 2:
            raise SkipPart(f"{torch.cuda.device_count()} CUDA device here; the 2-process run needs 2")
        flags = self.flags("train-2proc", False)
        proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                               "2", "-m", "ncal_core.train", *flags], cwd=REPO, env=without_interpreter(),
                              capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
        if proc.returncode:
            raise RuntimeError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
        result = throughput(bench_train.logged_steps(self.workdir / "train-2proc" / "metrics.jsonl"), arch(),
                            self.peak_tflops)
        return {"passed": result["losses_finite"], "processes": 2, "global_batch": 2 * self.args.batch, **result}

    def qlora_step(self) -> dict[str, Any]:
        """One QLoRA step (NF4 base) on one GPU: its memory against the memory model's."""
        return scale_steps(["qlora:1"], self.workdir / "qlora_step.json")

    def fsdp_2proc_step(self) -> dict[str, Any]:
        """One FSDP2 step over 2 processes (LoRA, QLoRA, full fine-tuning), when there are >= 2 GPUs."""
        if torch.cuda.device_count() < 2:
            raise SkipPart(f"{torch.cuda.device_count()} CUDA device here; the FSDP2 step needs 2")
        return scale_steps(["lora:2", "qlora:2", "full:2"], self.workdir / "fsdp_2proc_step.json")

    def eval_gpu_vs_cpu(self) -> dict[str, Any]:
        """The adapter of train_qwen05b's first run scored on the GPU (fp32, bf16) and the CPU (fp32), same rows."""
        from ncal_core.data.rows import load_examples
        from ncal_core.evaluation.evaluate import evaluate
        from ncal_core.evaluation.predictor import load_predictor

        trained = self.workdir / "train"
        if not (trained / "adapter_model.safetensors").is_file():
            raise RuntimeError(f"no adapter in {trained}: the train_qwen05b part did not finish")
        rows = load_examples(self.data / "TMWPL_test.jsonl")[: self.args.eval_rows]
        scored = {}
        for device, dtype in (("cpu", torch.float32), ("cuda", torch.float32), ("cuda", torch.bfloat16)):
            predictor = load_predictor(trained, dtype=dtype, device=device)
            builder = predictor.prompt_builder(predictor.labels)
            report, _ = evaluate(predictor.model, builder, rows, tc=predictor.tc,
                                 batch_size=16)
            scored[f"{device} {str(dtype).removeprefix('torch.')}"] = {
                "macro_f1": report["macro_f1"], "accuracy": report["accuracy"], "confusion": report["confusion"]}
            del predictor
            torch.cuda.empty_cache()
        reference = scored["cpu float32"]["macro_f1"]
        diffs = {dt: abs(scored[f"cuda {dt}"]["macro_f1"] - reference) for dt in EVAL_TOLERANCE}
        return {"passed": all(diffs[dt] <= EVAL_TOLERANCE[dt] for dt in diffs), "rows": len(rows),
                "tolerance": EVAL_TOLERANCE, "abs_diff_vs_cpu": diffs, "scored": scored}


# ---------------------------------------------------------------- the command

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON record")
    parser.add_argument("--tokenizer", type=Path, help="Qwen's tokenizer folder (default: .gpu_assets/tokenizers/"
                                                        "qwen3, else ../shared/tokenizers/qwen3)")
    parser.add_argument("--data", type=Path, help="folder with TMWPL_train/test.jsonl (default: .gpu_assets/data, "
                                                   "else ../shared/data)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of each 0.5B-shaped run")
    parser.add_argument("--batch", type=int, default=64, help="rows per step and process of the 0.5B-shaped runs")
    parser.add_argument("--eval_rows", type=int, default=128, help="TMWPL test rows scored on GPU and CPU")
    parser.add_argument("--workdir", type=Path, help="keep checkpoints and run outputs here (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.steps <= WARMUP_STEPS or min(args.batch, args.eval_rows) < 1:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps; --batch and --eval_rows must be >= 1")
    return args


def parts(run: Run) -> dict[str, Callable[[], dict[str, Any]]]:
    """The parts in the order they run (the evaluation reads the adapter train_qwen05b leaves)."""
    return {"cuda_tests": lambda: cuda_tests(run.workdir), "kernel_timings": kernel_timings,
            "train_qwen05b": run.train_qwen05b, "train_2proc": run.train_2proc, "qlora_step": run.qlora_step,
            "fsdp_2proc_step": run.fsdp_2proc_step, "eval_gpu_vs_cpu": run.eval_gpu_vs_cpu}


def check(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Every part, the record rewritten at args.out after each."""
    env = environment()
    record = new_record(env)
    for name, fn in parts(Run(args, workdir, env["peak_bf16_tflops"])).items():
        print(f"gpu_check: {name} ...", flush=True)
        add_part(record, name, run_part(fn))
        print(f"gpu_check: {name}: {record['parts'][name]['status']} ({record['parts'][name]['seconds']} s)",
              flush=True)
        write_record(args.out, record)
    record["complete"] = True
    write_record(args.out, record)
    return record


def main(argv: list[str] | None = None) -> int:
    """Run the check on a CUDA GPU (exit 1 when a part failed); without one, say so and do nothing."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing was run and nothing written.")
        return 0
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        record = check(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
            record = check(args, Path(tmp))
    print(f"gpu_check: {'passed' if record['passed'] else 'FAILED'}; record in {args.out}")
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
