"""Running the real commands in subprocesses on tiny data: rows, flags, environment and result files."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from ncal_core.train.log import TIMED

REPO = Path(__file__).resolve().parents[1]
LABELS = ["回忆", "识别", "推断"]
WORDS = ["三角形", "苹果", "长方形", "正方形", "小明", "比较", "大小", "读作", "判断", "对错", "分数", "钝角"]
# the built-in tiny model at its smallest: a training run of a few steps takes seconds
# a very small built-in model, trained on every row (no development split): these runs test the loop step by step
TINY = ["--tiny_hidden_size", "32", "--tiny_num_layers", "1", "--tiny_vocab_size", "300", "--val_size", "0"]


def tmwpl_rows(n: int, seed: int = 0, prefix: str = "r") -> list[dict]:
    """n TMWPL-format rows over LABELS, classes in turn, texts from WORDS (the class's first character in each)."""
    rng = random.Random(seed)
    return [{"id": f"{prefix}{i}", "question": "".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
             + LABELS[i % 3][0], "class": LABELS[i % 3]} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows one JSON object a line (UTF-8, unescaped) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def command_env(cache_dir: Path | None, **extra: str) -> dict[str, str]:
    """The environment of a command run by a test: its own model cache, one thread, this checkout importable."""
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if cache_dir is not None:
        env["NCAL_CACHE_DIR"] = str(cache_dir)
    env.update(extra)
    return env


def command(module: str, args: list[str]) -> list[str]:
    """`python -m <module> args...` with this interpreter."""
    return [sys.executable, "-m", module, *map(str, args)]


def run(module: str, args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command to completion, capturing its output as text."""
    return subprocess.run(command(module, args), env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    """A TCP port nobody listens on right now (for MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_command(args: list, script: Path | None = None) -> list[str]:
    """`accelerate launch` of 2 processes on the CPU, running ncal_core.train (or a script) with args."""
    target = ["-m", "ncal_core.train"] if script is None else [str(script)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *target, *map(str, args)]


def torchrun_command(args: list) -> list[str]:
    """`torch.distributed.run` of 2 CPU processes running ncal_core.train with args."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "ncal_core.train", *map(str, args)]


def launch_to_end(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a launcher to completion; on timeout kill it and its ranks (one process group), then fail."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    """The trained tensors a run left in its output folder: the adapter with LoRA, else the whole model."""
    adapter = output_dir / "adapter_model.safetensors"
    return load_file(adapter if adapter.is_file() else output_dir / "model.safetensors")


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| over every tensor; the two must hold the same names and shapes."""
    assert sorted(a) == sorted(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def metrics(output_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (throughput differs from run to run)."""
    lines = (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMED} for line in lines]


def logged_steps(output_dir: Path) -> int:
    """Training log lines written so far (one per step with --logging_steps 1); safe while a run writes."""
    try:
        text = (output_dir / "metrics.jsonl").read_text(encoding="utf-8")
    except FileNotFoundError:
        return 0
    return sum('"loss"' in line for line in text.splitlines())


def eval_report(output_dir: Path) -> dict:
    """eval.json of a finished run."""
    return json.loads((output_dir / "eval.json").read_text(encoding="utf-8"))


def trained_lora_run(root: Path, base: Path | None = None, rows: int = 48, flags: Sequence[str] = ()
                     ) -> tuple[Path, dict[str, str]]:
    """(output folder, command environment) of a few LoRA steps over `base` (default: a small random Qwen2 with a
    tokenizer) on `rows` TMWPL-format rows, its post-hoc tau fixed at 1.5 (the commands that read the run must apply
    it); `flags` go last, overriding the defaults here."""
    from checkpoint_with_tokenizer import make_checkpoint_with_tokenizer

    if base is None:
        base = make_checkpoint_with_tokenizer(root / "base", hidden_size=32, intermediate_size=64, layers=2, heads=2,
                                              kv_heads=1)
    env = command_env(root / "cache")
    out = root / "run"
    result = run("ncal_core.train", ["--model_name_or_path", str(base), "--dataset_path",
                                     str(write_jsonl(root / "train.jsonl", tmwpl_rows(rows))), "--eval_dataset_path",
                                     "none", "--output_dir", str(out), "--max_steps", "6", "--learning_rate", "5e-3",
                                     "--per_device_train_batch_size", "8", "--save_strategy", "no",
                                     "--logit_adjust_tau", "1.5", *flags], env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, env
