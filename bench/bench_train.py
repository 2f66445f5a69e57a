"""Training speed and memory of our loop against the reference's way (HF Trainer + PEFT + full logits), side by side.

    python -m bench.bench_train [--quick] [--json PATH] [--workdir DIR] [--repeats N] [--[no-]levers]
        [--model bench|Qwen2.5-0.5B|Qwen2.5-1.5B] [--dtype float32|bfloat16] [--reference_code DIR
        [--reference_python PY]]

Both sides train the same random Qwen2 (by default hidden 256, 4 layers, MLP 1024, 4 heads, 2 KV heads,
tied head; built here once with transformers' save_pretrained) on the same TMWPL rows encoded by
PromptBuilder, with LoRA r=8 alpha=32 dropout 0.1 on q/k/v/o, TC lambda = 1, the same batch size and number
of steps, the same weight dtype (fp32 unless --dtype bfloat16; LoRA weights stay fp32) on CPU, no
accumulation, no saving, no evaluation. Two shapes: `bpe4k` (a 4,096-token BPE trained on TMWPL) and `qwen`
(Qwen's real tokenizer, 151,936-row embedding).

--model Qwen2.5-0.5B or Qwen2.5-1.5B trains a random model of that architecture (bench/memory_model.py's
QWEN25) instead, shape `qwen` only, batch 8, QWEN_RUNS' short plan, one repeat and no levers unless asked:
a 0.5B step takes seconds on 2 CPU threads, a 1.5B step about three times as long.

Measured the same way on both sides:
- each side is its own subprocess, started by a bare launcher interpreter; its peak RSS is the kernel's
  high-water mark of that process (ru_maxrss of RUSAGE_CHILDREN in the launcher), its CPU time user +
  system. (Forked straight from this bench, a child's ru_maxrss would start at the bench's own RSS.);
- steady state is every step after the first `warmup` steps, timed per step: ours logs every step
  (--logging_steps 1; on CPU the log line's host sync costs nothing) and metrics.jsonl gives samples/s of
  each, the baseline's TrainerCallback stamps the end of each step. samples/s = rows / seconds over those
  steps, leaving out the steps that ran their FLOPs over 3x slower than the run's median step: on this
  shared machine another process's burst stalls every small parallel op of a 2-thread run for seconds;
  the steps left out are counted (`stalled_steps`) and `samples_per_s_all_steps` keeps them in. With
  --repeats N the two sides alternate N times and each keeps its fastest repeat (each lever run too);
- each side's peak includes its epoch's widest batch: ours runs it first by design, and the baseline
  gets its longest row moved into its first batch (it meets that batch at a random step of every epoch)
  unless that batch's full logits would not fit in memory; then the comparison is marked not like for like.

Model FLOPs per step (what the objective needs, counted on real tokens only), per token:
    L * (4 * P_frozen + 6 * P_lora) - 2 * P_qkv
P_frozen: matmul weights of q/k/v/o/gate/up/down of one layer; a frozen weight costs 2 (forward) + 2 (input
gradient; no weight gradient) FLOPs per token; a LoRA factor 2 + 4 (input and weight gradients); layer 0's
q/k/v need no input gradient (their input, the frozen embedding, needs none). Plus per row of n tokens
12 * L * nh * D * n^2 (QK^T and AV, full square, forward + 2x backward) and 4 * H * V per target token (the
head where the objective needs it, at the positions predicting label and eos; tied head frozen: forward +
input gradient). The baseline runs more than that (pads, the head at every position): its "executed" FLOPs
are reported apart. MFU = model FLOP/s (stalled steps left out) / the machine's torch.mm GFLOP/s in the
weights' dtype on the same thread count: its fastest single call of 1024^3 and 2048^3, before and after the
runs (the sustained rate over 2 s, which other processes' load lowers, is reported too).

The baseline is the project's re-creation of the reference (bench/reference_baseline.py), or with
--reference_code DIR the paper's own train.py from DIR run by --reference_python (bench/paper_code.py).
That script stamps no steps, so it runs for the warm-up steps and for all of them (after one warm-up-length
run that warms the page cache), and its samples/s is the extra rows over the extra wall time; its tokens and
FLOPs per sample are the mean row's. The report's `baseline` says which one ran.

--quick runs shape bpe4k only (batch 8, 10 steps, 480 rows, one repeat, no levers, 1 thread): a smoke test of
the whole path that other processes' load slows least.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import torch.nn.functional as F

from bench import memory_model
from bench.paper_code import (
    as_flags,
    code_script,
    differenced_runs,
    train_command,
    write_conversations,
    write_slow_tokenizer_files,
)
from ncal_core.data.batching import (
    ATTENTION_BLOCKS,
    collate,
)
from ncal_core.data.prompts import EncodedRow, PromptBuilder
from ncal_core.data.registry import resolve_dataset
from ncal_core.data.rows import label_set, load_examples
from ncal_core.model.lora import inject_lora
from ncal_core.model.qwen import ModelConfig, QwenModel
from ncal_core.model.tiny import tiny_config
from ncal_core.model.tokenizer import load_tokenizer
from ncal_core.train.log import FlopModel

REPO = Path(__file__).resolve().parents[1]
# Qwen's real tokenizer, never committed: ../shared/tokenizers/qwen3 (or under $NCAL_SHARED_DIR, as the tests)
QWEN_TOKENIZER = Path(os.environ.get("NCAL_SHARED_DIR", REPO.parent / "shared")) / "tokenizers" / "qwen3"
QWEN_VOCAB = 151_936  # Qwen2.5's embedding rows
SEED = 42
LAMBDA_LC = 1.0
LORA_R = 8
# the training both sides run, by the flag names ours shares with the paper's train.py
TRAINING = {"lora_r": LORA_R, "lora_alpha": 32, "lora_dropout": 0.1, "lambda_lc": LAMBDA_LC, "learning_rate": 2e-4,
            "seed": SEED}
# the default model; its vocab is the qwen shape's, and bpe4k's checkpoint replaces it with its tokenizer's size
BENCH_ARCH = tiny_config(QWEN_VOCAB, hidden_size=256, num_layers=4)  # 4 heads of 64, 2 KV heads, MLP 1024, tied
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# --model -> architecture (Qwen2.5-7B is left out: its fp32 weights alone exceed this machine's memory)
ARCHS = {"bench": BENCH_ARCH, **{name: memory_model.QWEN25[name] for name in ("Qwen2.5-0.5B", "Qwen2.5-1.5B")}}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# (shape, batch) -> (steps, warm-up steps left out of the rates)
FULL_RUNS = {("bpe4k", 8): (60, 10), ("bpe4k", 32): (30, 5), ("qwen", 8): (30, 5), ("qwen", 32): (12, 3)}
QUICK_RUNS = {("bpe4k", 8): (10, 3)}
QUICK_ROWS = 480
# a Qwen2.5 architecture on 2 CPU threads at fp32 (bf16 runs faster): a 0.5B step ~3 s ours, ~6 s the baseline's;
# 6 steady steps are enough for a rate and keep the 1.5B pair to about seven minutes
QWEN_RUNS = {("qwen", 8): (8, 2)}
# our loop with one flag changed, at batch 8
LEVERS = {"group_by_length": ["--group_by_length", "true"], "one padded batch": ["--padding_free", "false"],
          "torch_compile": ["--torch_compile", "true"], "gradient_checkpointing": ["--gradient_checkpointing", "true"],
          "bf16 autocast": ["--bf16", "true"], "no TC loss": ["--use_etf_loss", "false"],
          "no LoRA dropout": ["--lora_dropout", "0"]}
TARGETS = {"qwen": {"samples_ratio": 8.0, "rss_ratio": 0.35}, "bpe4k": {"samples_ratio": 2.0}, "mfu": 0.40}
# a steady step this many times slower (per executed FLOP) than the run's median is a stall from other processes
STALL = 3.0
# the baseline's widest batch is run first only if its logits, log-softmax and their grads fit in this share
# of the available memory, and the whole step (weights and activations too) in MEMORY_SHARE
LOGITS_MEMORY_SHARE = 0.4
MEMORY_SHARE = 0.7


RECREATION = "the project's re-creation: bench/reference_baseline.py"


# ---------------------------------------------------------------- set-up: checkpoints and rows

def copy_tokenizer(source: Path, folder: Path) -> None:
    """Qwen's tokenizer files from source into the checkpoint folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(source / name, folder / name)


def write_tokenizer(folder: Path, shape: str, texts: list[str]) -> None:
    """The shape's tokenizer into folder: a 4,096-token BPE trained on `texts` (bpe4k), or Qwen's own (qwen)."""
    from ncal_core.model.tiny_tokenizer import train_tokenizer

    if shape == "bpe4k":
        folder.mkdir(parents=True, exist_ok=True)
        train_tokenizer(texts, folder, vocab_size=4096)
    elif (QWEN_TOKENIZER / "tokenizer.json").is_file():
        copy_tokenizer(QWEN_TOKENIZER, folder)
    else:
        raise SystemExit(f"shape qwen needs Qwen's tokenizer at {QWEN_TOKENIZER} (set NCAL_SHARED_DIR)")


def build_checkpoint(folder: Path, arch: ModelConfig, dtype: torch.dtype = torch.float32,
                     device: str = "cpu") -> None:
    """A random Qwen2 of arch's shape, initialised on `device` and saved by transformers in `dtype`, next to the
    tokenizer already in folder (whose eos and pad ids its config takes)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = load_tokenizer(folder)
    # TMWPL's rows are under 400 tokens; a longer RoPE table would only cost memory
    config = Qwen2Config.from_dict({**dataclasses.replace(arch, max_position_embeddings=4096).to_hf(),
                                    "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                                    "bos_token_id": None})
    torch.manual_seed(SEED)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.to(dtype).save_pretrained(folder)


@dataclass
class Shape:
    """One benchmark shape: its checkpoint (architecture with the tokenizer's vocab, weight dtype), its encoded
    rows and the files both sides read."""

    name: str
    folder: Path
    arch: ModelConfig
    dtype: str
    labels: list[str]
    rows: list[EncodedRow]
    train_file: Path  # the rows as TMWPL JSON lines, for our loop
    ids_file: Path  # the same rows as ids, for the baseline


def prepare_shape(name: str, arch: ModelConfig, dtype: str, workdir: Path, train_path: Path,
                  row_limit: int | None) -> Shape:
    """Build the checkpoint, pick the rows, encode them once with PromptBuilder and write them for both sides."""
    examples = load_examples(train_path)
    labels = label_set(examples, train_path)
    # the 4k BPE learns from every TMWPL question and label, whatever subset trains
    texts = [m["content"] for e in examples for m in e.messages] + [e.label for e in examples]
    folder = workdir / f"model-{name}"
    write_tokenizer(folder, name, texts)
    if name == "bpe4k":
        arch = dataclasses.replace(arch, vocab_size=len(load_tokenizer(folder)))
    build_checkpoint(folder, arch, DTYPES[dtype])
    lines = [line for line in train_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if row_limit is not None and row_limit < len(examples):
        keep = sorted(np.random.default_rng(SEED).permutation(len(examples))[:row_limit].tolist())
        examples, lines = [examples[i] for i in keep], [lines[i] for i in keep]
    rows = PromptBuilder(load_tokenizer(folder), labels).encode_all(examples)
    train_file, ids_file = workdir / f"rows-{name}.jsonl", workdir / f"ids-{name}.jsonl"
    train_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ids_file.write_text("".join(json.dumps({"input_ids": r.input_ids, "prompt_len": r.prompt_len,
                                            "class_index": r.label_index}) + "\n" for r in rows), encoding="utf-8")
    return Shape(name, folder, arch, dtype, labels, rows, train_file, ids_file)


# ---------------------------------------------------------------- counting

def batch_stats(rows: list[EncodedRow], padding_free: bool = False) -> dict[str, int]:
    """Rows, real tokens, sum of squared lengths, target tokens and widest row of one batch, and the tokens the
    layers' matmuls run on (`padded`) and attention's rows x squared widths (`padded_sq`): one padded batch, or
    ours padding-free (real tokens only; attention in the blocks that ncal_core.train's collate cuts)."""
    n = [len(r.input_ids) for r in rows]
    stats = {"rows": len(rows), "tokens": sum(n), "sq_tokens": sum(x * x for x in n),
             "targets": sum(len(r.input_ids) - r.prompt_len for r in rows), "width": max(n)}
    if not padding_free:
        return {**stats, "padded": len(n) * max(n), "padded_sq": len(n) * max(n) ** 2}
    blocks = collate(rows, 0, ATTENTION_BLOCKS).ragged.blocks
    return {**stats, "padded": sum(n), "padded_sq": sum(p.rows * p.width ** 2 for _, _, p in blocks)}


def logged_steps(metrics_file: Path) -> list[dict[str, Any]]:
    """Each step's work and seconds as ncal_core.train logged them (one line a step with --logging_steps 1), in
    batch_stats' terms."""
    records = [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines()]
    records = [r for r in records if "samples_per_s" in r]
    if [r["step"] for r in records] != list(range(1, len(records) + 1)):
        raise RuntimeError(f"{metrics_file}: expected one line per step from step 1 (--logging_steps 1)")
    return [{"step": r["step"], "loss": r["loss"], "seconds": r["seconds"], "rows": r["rows"], "tokens": r["tokens"],
             "sq_tokens": r["sq_tokens"], "targets": r["target_tokens"], "padded": r["padded_tokens"],
             "padded_sq": r["attended"]} for r in records]


def flop_model(a: ModelConfig) -> FlopModel:
    """The FLOP model ncal_core.train's log counts MFU with, for architecture `a` under both sides' LoRA (r=LORA_R
    on q/k/v/o, the rest frozen); the model is built on the meta device, so no weight is allocated."""
    model = QwenModel(a, device=torch.device("meta"))
    inject_lora(model, LORA_R, TRAINING["lora_alpha"], 0.0, LORA_TARGETS)
    return FlopModel.of(model)


def model_flops(stats: dict[str, int], flops: FlopModel) -> float:
    """Model FLOPs of one step: real tokens, the head only where the objective needs it."""
    return flops(stats["tokens"], stats["sq_tokens"], stats["targets"])


def executed_flops(stats: dict[str, int], flops: FlopModel, full_head: bool) -> float:
    """FLOPs actually run: every padded position through the layers, and the head everywhere with full logits."""
    return flops(stats["padded"], stats["padded_sq"], stats["padded"] if full_head else stats["targets"])


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float) -> dict[str, float]:
    """torch.mm [m, k] x [k, n] in dtype on the current threads: sustained (all calls in `seconds`) and best call."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    calls, best, start = 0, float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        torch.mm(a, b)
        best, calls = min(best, time.perf_counter() - t), calls + 1
    flop = 2 * m * k * n
    return {"sustained": flop * calls / (time.perf_counter() - start) / 1e9, "best": flop / best / 1e9}


def machine_matmul(token_rows: int, a: ModelConfig, dtype: torch.dtype,
                   seconds: float) -> dict[str, dict[str, float]]:
    """Square (peak-like) and model-shaped (tokens x hidden x MLP width) matmul GFLOP/s in dtype."""
    return {"mm_1024": matmul_gflops(1024, 1024, 1024, dtype, seconds),
            "mm_2048": matmul_gflops(2048, 2048, 2048, dtype, seconds),
            "mm_model": matmul_gflops(token_rows, a.hidden_size, a.intermediate_size, dtype, seconds)}


# ---------------------------------------------------------------- running the two sides

def child_env(threads: int) -> dict[str, str]:
    """The same thread count and offline settings for every subprocess."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


# Runs the measured command as its own child and reports that child's rusage. A child forked straight from
# this process would inherit this process's RSS into its ru_maxrss (the kernel keeps the pre-exec high-water
# mark), so the small launcher stands in between: what it forks from is a bare interpreter.
LAUNCHER = """
import json, resource, subprocess, sys
out, timeout, cmd = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
try:
    code = subprocess.run(cmd, timeout=timeout).returncode
except subprocess.TimeoutExpired:
    code = 124
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as handle:
    json.dump({"maxrss_kib": usage.ru_maxrss, "cpu_s": usage.ru_utime + usage.ru_stime}, handle)
sys.exit(code)
"""


def run_measured(cmd: list[str], log_stem: Path, threads: int, timeout: float) -> dict[str, float]:
    """Run cmd as a grandchild under LAUNCHER: wall time, CPU time and peak RSS (kernel high-water mark), or raise."""
    usage_file = Path(f"{log_stem}.rusage.json")
    with open(f"{log_stem}.out", "w") as out, open(f"{log_stem}.err", "w") as err:
        start = time.perf_counter()
        code = subprocess.run([sys.executable, "-c", LAUNCHER, str(usage_file), str(timeout), *cmd], cwd=REPO,
                              env=child_env(threads), stdout=out, stderr=err).returncode
        wall = time.perf_counter() - start
    if code:
        why = f"timed out after {timeout:.0f} s" if code == 124 else f"exit {code}"
        raise RuntimeError(f"{why}: {' '.join(cmd)}\n{Path(f'{log_stem}.err').read_text()[-3000:]}")
    usage = json.loads(usage_file.read_text())
    return {"wall_s": wall, "cpu_s": usage["cpu_s"], "peak_rss_mb": usage["maxrss_kib"] / 1024}  # Linux: KiB


def rates(steps: list[dict[str, Any]], a: ModelConfig, full_head: bool) -> dict[str, float]:
    """Samples/s, tokens/s and FLOPs over the steady-state steps (each: batch_stats + its "seconds").

    A step that ran its executed FLOPs STALL times slower than the run's median step is counted as stalled
    by other processes and left out of the rates (`samples_per_s_all_steps` keeps it in).
    """
    flops_of = flop_model(a)

    def rate(s: dict[str, Any]) -> float:
        return executed_flops(s, flops_of, full_head) / s["seconds"]

    median = statistics.median(rate(s) for s in steps)
    kept = [s for s in steps if rate(s) * STALL >= median]
    seconds = sum(s["seconds"] for s in kept)
    rows, tokens = sum(s["rows"] for s in kept), sum(s["tokens"] for s in kept)
    padded = sum(s["padded"] for s in kept)
    flops = sum(model_flops(s, flops_of) for s in kept)
    return {"steady_steps": len(steps), "stalled_steps": len(steps) - len(kept), "steady_s": seconds,
            "samples_per_s": rows / seconds,
            "samples_per_s_all_steps": sum(s["rows"] for s in steps) / sum(s["seconds"] for s in steps),
            "real_tokens_per_s": tokens / seconds, "padded_tokens_per_s": padded / seconds,
            "pad_fraction": 1 - tokens / padded, "mean_width": padded / rows,
            "model_gflops_per_step": flops / len(kept) / 1e9,
            "executed_gflops_per_step": sum(executed_flops(s, flops_of, full_head) for s in kept) / len(kept) / 1e9,
            "model_gflops_per_s": flops / seconds / 1e9}


def train_flags(shape: Shape, batch: int, steps: int, out_dir: Path, flags: list[str]) -> list[str]:
    """The flags of `python -m ncal_core.train` that train the shape as the baseline does, then `flags`."""
    return ["--model_name_or_path", str(shape.folder),
            "--dataset_path", str(shape.train_file), "--label_types", ",".join(shape.labels),
            "--eval_dataset_path", "none", "--save_strategy", "no", "--eval_strategy", "no",
            "--output_dir", str(out_dir), "--overwrite_output_dir", "true", "--use_lora", "true",
            *as_flags(TRAINING),
            "--target_modules", ",".join(LORA_TARGETS),
            "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "1",
            "--max_steps", str(steps), "--logging_steps", "1", "--torch_dtype", shape.dtype,
            # uniform rows, as the baseline's sampler (and our_plan) draws them; TC on one token, as the baseline's
            "--resample", "none", "--pooling", "last", *flags]


def run_ours(shape: Shape, batch: int, steps: int, warmup: int, flags: list[str], tag: str, workdir: Path,
             threads: int, timeout: float) -> dict[str, Any]:
    """`python -m ncal_core.train` on the shape; per-step rates from its metrics.jsonl after the warm-up lines."""
    out_dir = workdir / f"ours-{tag}"
    # every row trained on, as the baseline does: no development split and no evaluation of it
    every_row = ["--val_size", "0", *flags]
    cmd = [sys.executable, "-m", "ncal_core.train", *train_flags(shape, batch, steps, out_dir, every_row)]
    proc = run_measured(cmd, workdir / f"ours-{tag}", threads, timeout)
    logged = logged_steps(out_dir / "metrics.jsonl")
    if len(logged) != steps:
        raise RuntimeError(f"{out_dir}/metrics.jsonl: expected one line per step 1..{steps}")
    return {"side": "ours", "shape": shape.name, "vocab": shape.arch.vocab_size, "dtype": shape.dtype, "batch": batch,
            "steps": steps, "warmup_steps": warmup, "flags": " ".join(flags),
            "max_width": max(len(r.input_ids) for r in shape.rows),
            **proc, **rates(logged[warmup:], shape.arch, full_head=False)}


def widest_batch_fits(shape: Shape, batch: int) -> bool:
    """Whether the baseline's batch holding the longest row fits safely: its fp32 logits, log-softmax and their
    grads, and with them the weights and the activations kept for backward (memory_model's terms, in the
    weights' dtype)."""
    width, a = max(len(r.input_ids) for r in shape.rows), shape.arch
    size = DTYPES[shape.dtype].itemsize
    logits = 4 * batch * width * a.vocab_size * 4
    step = (logits + size * memory_model.parameter_count(a)
            + a.num_hidden_layers * memory_model.layer_activation_bytes(a, batch, width, LORA_R, size))
    available = psutil.virtual_memory().available
    return logits < LOGITS_MEMORY_SHARE * available and step < MEMORY_SHARE * available


def run_baseline(shape: Shape, batch: int, steps: int, warmup: int, tag: str, workdir: Path, threads: int,
                 timeout: float) -> dict[str, Any]:
    """bench/reference_baseline.py (the project's re-creation) on the same rows; per-step rates after `warmup`
    steps."""
    out = workdir / f"baseline-{tag}.json"
    longest_first = widest_batch_fits(shape, batch)
    cmd = [sys.executable, "-m", "bench.reference_baseline", "--model", str(shape.folder),
           "--rows", str(shape.ids_file), "--num_classes", str(len(shape.labels)), "--batch", str(batch),
           "--steps", str(steps), "--lambda_lc", str(LAMBDA_LC), "--seed", str(SEED), "--dtype", shape.dtype,
           "--output_dir", str(workdir / f"baseline-{tag}"), "--out", str(out)]
    proc = run_measured(cmd + (["--longest_first"] if longest_first else []), workdir / f"baseline-{tag}", threads,
                        timeout)
    log = json.loads(out.read_text())
    ends, batches = log["step_ends"], log["batches"]
    if len(ends) != steps or len(batches) != steps:
        raise RuntimeError(f"baseline logged {len(ends)} step ends and {len(batches)} batches for {steps} steps")
    steady = [{**b, "padded": b["rows"] * b["width"], "padded_sq": b["rows"] * b["width"] ** 2,  # one padded batch
               "seconds": end - before} for b, end, before in zip(batches, ends, [log["train_begin"], *ends])]
    return {"side": "baseline", "code": RECREATION, "shape": shape.name, "vocab": shape.arch.vocab_size,
            "dtype": shape.dtype, "batch": batch, "steps": steps, "warmup_steps": warmup,
            "flags": "--longest_first" if longest_first else "", "longest_first": longest_first,
            "rss_note": "" if longest_first else "the baseline's widest batch would not fit",
            "max_width": max(b["width"] for b in batches), **proc, **rates(steady[warmup:], shape.arch, full_head=True)}


def run_paper_baseline(shape: Shape, batch: int, steps: int, warmup: int, tag: str, workdir: Path, threads: int,
                       timeout: float, code: Path, python: str) -> dict[str, Any]:
    """The paper's own train.py on the same rows, run for `warmup` steps (once to warm up, discarded), `steps`
    and `warmup` again: samples/s is the extra rows over the extra wall time, peak RSS the longer run's. It logs
    no per-step batches, so its tokens and model FLOPs per sample are the mean row's (the expectation under its
    uniform sampler)."""
    data = workdir / f"paper-rows-{shape.name}.json"
    if not data.exists():  # the same rows for every repeat
        write_conversations(load_examples(shape.train_file), data)
    write_slow_tokenizer_files(shape.folder)

    def run(n: int) -> dict[str, float]:
        cmd = train_command(python, code, shape.folder, data, workdir / f"paper-{tag}-{n}", shape.labels, batch, n,
                            shape.dtype, TRAINING)
        return run_measured(cmd, workdir / f"paper-{tag}-{n}", threads, timeout)

    steps_per_s, short, long = differenced_runs(run, warmup, steps)
    samples_per_s = batch * steps_per_s
    mean = {key: statistics.mean(batch_stats([r])[key] for r in shape.rows) for key in ("tokens", "sq_tokens",
                                                                                        "targets")}
    step_flops = model_flops(mean, flop_model(shape.arch))
    return {"side": "baseline", "code": f"the paper's code: {code / 'train.py'} under {python}", "shape": shape.name,
            "vocab": shape.arch.vocab_size, "dtype": shape.dtype, "batch": batch, "steps": steps,
            "warmup_steps": warmup,
            "flags": "", "longest_first": False,
            "rss_note": "the paper's code meets its widest batch at a random step, which a short run may miss",
            **long, "wall_s_short": short["wall_s"], "samples_per_s": samples_per_s,
            "samples_per_s_all_steps": samples_per_s, "real_tokens_per_s": samples_per_s * mean["tokens"],
            "model_gflops_per_step": batch * step_flops / 1e9, "model_gflops_per_s": samples_per_s * step_flops / 1e9}


# ---------------------------------------------------------------- the label-only head, in process

def head_microbench(shape: Shape, batch: int, reps: int) -> dict[str, Any]:
    """Forward + backward of TrainingObjective (label-only head; its weight pre-packed, and not) vs full [B, T, V]
    logits + masked CE, same model."""
    from ncal_core.loss.objective import TrainingObjective
    from ncal_core.model.head import packing_available
    from ncal_core.model.lora import inject_lora
    from ncal_core.model.qwen import load_model

    torch.manual_seed(SEED)
    model = load_model(shape.folder, DTYPES[shape.dtype])
    inject_lora(model, LORA_R, 32.0, 0.1, ["q_proj", "k_proj", "v_proj", "o_proj"])
    model.train()
    # a typical batch: the middle one of length-sorted rows
    rows = sorted(shape.rows[: batch * 50], key=lambda r: len(r.input_ids))
    middle = len(rows) // 2 - batch // 2
    data = collate(rows[middle: middle + batch], load_tokenizer(shape.folder).pad_token_id)
    objective = TrainingObjective(model, padding_free=False)  # the same decoder path as full_logits
    positions = torch.arange(data.input_ids.shape[1])[None, :]
    labels = data.input_ids.masked_fill((positions < data.prompt_lens[:, None]) | (data.attention_mask == 0), -100)

    def label_only(pack: bool = True) -> None:
        objective.head.pack = pack and packing_available()
        lm_sum = objective(data).lm_sum
        (lm_sum / len(data.target)).backward()

    def full_logits() -> None:
        logits = model.lm_head(model(data.input_ids)).float()  # [B, T, V]; right padding: causal mask as ours
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                        ignore_index=-100).backward()

    result = {"shape": shape.name, "vocab": shape.arch.vocab_size, "batch": batch,
              "width": int(data.input_ids.shape[1]),
              "targets": len(data.target)}
    for name, fn in (("label_only", label_only), ("label_only_unpacked", lambda: label_only(pack=False)),
                     ("full_logits", full_logits)):
        times = []
        for _ in range(reps + 1):  # the first call is warm-up
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[f"{name}_ms"] = 1000 * min(times[1:])  # the least disturbed by other processes
    result["speedup"] = result["full_logits_ms"] / result["label_only_ms"]
    result["packing_speedup"] = result["label_only_unpacked_ms"] / result["label_only_ms"]
    result["full_logits_mb"] = data.input_ids.numel() * shape.arch.vocab_size * 4 * 2 / 2**20  # fp32 logits + grad
    result["label_logits_mb"] = len(data.target) * shape.arch.vocab_size * 4 * 2 / 2**20
    return result


# ---------------------------------------------------------------- report

def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Rows as a left-aligned text table under a title."""
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "" if value is None else str(value)

    cells = [columns] + [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    print(f"\n{title}")
    for line in cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def compare(ours: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Ratios ours/baseline and which of the issue's targets hold."""
    row = {"shape": ours["shape"], "batch": ours["batch"],
           "samples_ratio": ours["samples_per_s"] / base["samples_per_s"],
           "samples_ratio_all_steps": ours["samples_per_s_all_steps"] / base["samples_per_s_all_steps"],
           "real_tokens_ratio": ours["real_tokens_per_s"] / base["real_tokens_per_s"],
           "rss_ratio": ours["peak_rss_mb"] / base["peak_rss_mb"],
           "rss_like_for_like": base["longest_first"], "mfu_ours": ours["mfu"], "mfu_baseline": base["mfu"]}
    target = TARGETS[ours["shape"]]
    checks = {"samples_ratio": row["samples_ratio"] >= target["samples_ratio"], "mfu": ours["mfu"] >= TARGETS["mfu"]}
    if "rss_ratio" in target:
        checks["rss_ratio"] = row["rss_ratio"] <= target["rss_ratio"]
    row["targets_met"] = checks
    row["verdict"] = ", ".join(f"{k} {'ok' if v else 'MISS'}" for k, v in checks.items())
    if base["rss_note"]:
        row["verdict"] += f" (rss not like for like: {base['rss_note']})"
    return row


def fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the highest steady samples/s, with every repeat's rate and the highest peak RSS."""
    best = max(runs, key=lambda r: r["samples_per_s"])
    return {**best, "repeats_samples_per_s": [r["samples_per_s"] for r in runs],
            "repeats_peak_rss_mb": [r["peak_rss_mb"] for r in runs], "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def write_report(path: Path, report: dict[str, Any]) -> None:
    """The report as JSON at path (also after each stage, marked partial, so a late failure keeps the runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False))


@dataclass(frozen=True)
class Plan:
    """What one invocation trains and how often, resolved from its flags."""

    arch: ModelConfig  # each shape's checkpoint takes its own tokenizer's vocab
    runs: dict[tuple[str, int], tuple[int, int]]  # (shape, batch) -> (steps, warm-up steps left out of the rates)
    row_limit: int | None  # TMWPL train rows the shapes keep (None: all)
    repeats: int
    threads: int
    levers: bool
    dtype: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shape bpe4k only, batch 8, 10 steps, no levers")
    parser.add_argument("--model", choices=list(ARCHS), default="bench",
                        help="bench: the small model, both shapes (default); a Qwen2.5 name: a random model of "
                             "that architecture, shape qwen, batch 8, a short plan")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights of both sides")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "bench_train.json")
    parser.add_argument("--workdir", type=Path, help="keep checkpoints and logs here (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, help="alternate ours/baseline this many times (default 2; 1 with "
                                                    "--quick or a Qwen2.5 model)")
    parser.add_argument("--levers", action=argparse.BooleanOptionalAction,
                        help="run the lever runs (default: with the bench model only; never with --quick)")
    parser.add_argument("--threads", type=int, help="torch threads of every run and of the matmul measurement "
                        "(default 2, quick 1: one thread is not stalled by other processes' load)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    parser.add_argument("--reference_code", type=Path, help="the paper's code/ folder: its train.py is the baseline "
                        "instead of the project's re-creation (bench/paper_code.py)")
    parser.add_argument("--reference_python", default=sys.executable,
                        help="the interpreter that runs --reference_code, with its stack (default: this one)")
    args = parser.parse_args(argv)
    if args.reference_code is not None:
        code_script(args.reference_code, "train.py")
    if args.quick and args.model != "bench":
        parser.error("--quick is the bench model's smoke test; a Qwen2.5 model has its own short plan")
    return args


def resolve_plan(args: argparse.Namespace) -> Plan:
    """The bench model's full or quick plan, or QWEN_RUNS for a Qwen2.5 architecture (one repeat, no levers)."""
    qwen = args.model != "bench"
    default_levers = not (args.quick or qwen)
    return Plan(arch=ARCHS[args.model], runs=QWEN_RUNS if qwen else QUICK_RUNS if args.quick else FULL_RUNS,
                row_limit=QUICK_ROWS if args.quick else None, repeats=args.repeats or (2 if default_levers else 1),
                threads=args.threads or (1 if args.quick else min(2, os.cpu_count() or 1)),
                levers=not args.quick and (default_levers if args.levers is None else args.levers), dtype=args.dtype)


def run_and_write(json_path: Path, workdir: Path | None, run: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """run(folder) in workdir (None: a temporary folder, removed after), its report timed and written as JSON."""
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="ncal-bench-")) if workdir is None else workdir
    folder.mkdir(parents=True, exist_ok=True)
    try:
        report = run(folder)
    finally:
        if workdir is None:
            shutil.rmtree(folder, ignore_errors=True)
    report["bench_wall_s"] = time.perf_counter() - started
    write_report(json_path, report)
    print(f"\nwrote {json_path} ({report['bench_wall_s']:.0f} s)")
    return report


def main(argv: list[str] | None = None) -> int:
    """Build, run both sides per shape and batch, run the levers, print the tables and write JSON."""
    args = parse_args(argv)
    plan = resolve_plan(args)
    torch.set_num_threads(plan.threads)
    run_and_write(args.json, args.workdir, lambda workdir: run_all(args, plan, workdir))
    return 0


def run_all(args: argparse.Namespace, plan: Plan, workdir: Path) -> dict[str, Any]:
    """Everything the report holds."""
    train_path = resolve_dataset("tmwpl", "train")
    shapes = {name: prepare_shape(name, plan.arch, plan.dtype, workdir, train_path, plan.row_limit)
              for name in dict.fromkeys(shape for shape, _ in plan.runs)}
    # the model-shaped matmul: 8 mean-length rows through the MLP's up projection
    mm_rows = 8 * round(statistics.mean(len(r.input_ids) for r in next(iter(shapes.values())).rows))
    load = [os.getloadavg()[0]]
    mm_seconds = 0.5 if args.quick else 2.0
    mm_dtype = DTYPES[plan.dtype]
    mm_before = machine_matmul(mm_rows, plan.arch, mm_dtype, mm_seconds)
    print(f"{plan.dtype} torch.mm, {plan.threads} threads, sustained GFLOP/s: "
          + ", ".join(f"{k} {v['sustained']:.1f}" for k, v in mm_before.items()) + f"; load average {load[0]:.2f}",
          flush=True)

    runs, pairs = [], []
    for (name, batch), (steps, warmup) in plan.runs.items():
        shape, tried = shapes[name], {"ours": [], "baseline": []}
        for repeat in range(plan.repeats):
            tag = f"{name}-b{batch}-r{repeat}"
            tried["ours"].append(run_ours(shape, batch, steps, warmup, [], tag, workdir, plan.threads, args.timeout))
            tried["baseline"].append(
                run_baseline(shape, batch, steps, warmup, tag, workdir, plan.threads, args.timeout)
                if args.reference_code is None else
                run_paper_baseline(shape, batch, steps, warmup, tag, workdir, plan.threads, args.timeout,
                                   args.reference_code, args.reference_python))
            load.append(os.getloadavg()[0])
            print(f"{tag}: ours {tried['ours'][-1]['samples_per_s']:.1f}/s {tried['ours'][-1]['peak_rss_mb']:.0f} MB, "
                  f"baseline {tried['baseline'][-1]['samples_per_s']:.1f}/s "
                  f"{tried['baseline'][-1]['peak_rss_mb']:.0f} MB; load {load[-1]:.2f}", flush=True)
        ours, base = fastest(tried["ours"]), fastest(tried["baseline"])
        runs += [ours, base]
        pairs.append((ours, base))
        write_report(args.json, {"mode": "quick" if args.quick else "full", "partial": True, "runs": runs})

    levers = []
    if plan.levers:
        for name, shape in shapes.items():
            steps, warmup = plan.runs[(name, 8)]
            default = next(r for r in runs if r["side"] == "ours" and r["shape"] == name and r["batch"] == 8)
            levers.append({**default, "lever": "default"})
            for lever, flags in LEVERS.items():
                tag = f"{name}-b8-{lever.replace(' ', '_')}"
                try:  # the fastest of as many repeats as the default had: the same footing against stalls
                    run = fastest([run_ours(shape, 8, steps, warmup, flags, f"{tag}-r{repeat}", workdir,
                                            plan.threads, args.timeout) for repeat in range(plan.repeats)])
                except RuntimeError as err:  # a lever that fails here is reported, not hidden
                    levers.append({"shape": name, "lever": lever, "flags": " ".join(flags), "error": str(err)[-500:]})
                    continue
                levers.append({**run, "lever": lever, "speed_vs_default": run["samples_per_s"] / default["samples_per_s"],
                               "rss_vs_default": run["peak_rss_mb"] / default["peak_rss_mb"]})
                print(f"lever {tag}: {run['samples_per_s']:.1f}/s {run['peak_rss_mb']:.0f} MB", flush=True)
    write_report(args.json, {"mode": "quick" if args.quick else "full", "partial": True, "runs": runs,
                             "levers": levers})
    heads = [head_microbench(shape, 8, 3 if shape.arch.vocab_size > 10_000 else 5) for shape in shapes.values()]

    mm_after = machine_matmul(mm_rows, plan.arch, mm_dtype, mm_seconds)
    load.append(os.getloadavg()[0])
    peak = max(m[k]["best"] for m in (mm_before, mm_after) for k in ("mm_1024", "mm_2048"))
    sustained = max(m[k]["sustained"] for m in (mm_before, mm_after) for k in ("mm_1024", "mm_2048"))
    for run in runs + [lever for lever in levers if "error" not in lever]:
        run["mfu"] = run["model_gflops_per_s"] / peak
        run["mfu_vs_sustained_mm"] = run["model_gflops_per_s"] / sustained
    comparisons = [compare(ours, base) for ours, base in pairs]
    memory_rows = [{"model": name, **memory_model.memory(a, 8, 512)} for name, a in memory_model.QWEN25.items()]

    print_table(f"Steady-state training, model {args.model}, {plan.dtype} weights on CPU (fastest of the repeats)",
                runs,
                ["side", "shape", "batch", "steady_steps", "stalled_steps", "samples_per_s",
                 "samples_per_s_all_steps", "real_tokens_per_s", "pad_fraction", "max_width", "peak_rss_mb", "model_gflops_per_step",
                 "executed_gflops_per_step", "mfu", "wall_s", "cpu_s"])
    baseline = next(r["code"] for r in runs if r["side"] == "baseline")
    print(f"\nbaseline: {baseline}")
    print_table("Ours / baseline", comparisons,
                ["shape", "batch", "samples_ratio", "samples_ratio_all_steps", "real_tokens_ratio", "rss_ratio",
                 "mfu_ours", "mfu_baseline", "verdict"])
    if levers:
        print_table("Levers of our loop (batch 8, one flag changed)", levers,
                    ["shape", "lever", "stalled_steps", "samples_per_s", "speed_vs_default",
                     "peak_rss_mb", "rss_vs_default", "mfu", "error"])
    print_table("Label-only head vs full logits: forward + backward in process (batch 8, best of reps)", heads,
                ["shape", "vocab", "width", "targets", "label_only_ms", "label_only_unpacked_ms", "packing_speedup",
                 "full_logits_ms", "speedup",
                 "full_logits_mb", "label_logits_mb"])
    print()
    print(memory_model.table(memory_rows))
    print(f"\nMFU is against {peak:.1f} GFLOP/s, the fastest single {plan.dtype} torch.mm call (1024^3 and 2048^3, "
          f"before and after the runs); sustained over {mm_seconds:.0f} s they reached {sustained:.1f}. "
          "Load average during the runs: "
          + " ".join(f"{x:.1f}" for x in load) + f" on {os.cpu_count()} CPUs (other processes share this machine).")
    return {
        "mode": "quick" if args.quick else "full",
        "machine": {"threads": plan.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "matmul_gflops_before": mm_before, "matmul_gflops_after": mm_after, "mm_model_rows": mm_rows,
                    "mfu_denominator_gflops": peak, "mfu_denominator_dtype": plan.dtype,
                    "sustained_mm_gflops": sustained, "loadavg": load},
        "model": {name: asdict(shape.arch) for name, shape in shapes.items()}, "lora_r": LORA_R, "dtype": plan.dtype,
        "lambda_lc": LAMBDA_LC, "repeats": plan.repeats, "baseline": baseline, "runs": runs,
        "comparisons": comparisons,
        "levers": levers, "head_microbench": heads,
        "memory_model": {"computed_not_measured": True, "rows": memory_rows},
    }


if __name__ == "__main__":
    sys.exit(main())
