"""The paper's own code (the `code/` folder of its public repository) as the benchmarks' baseline, where a user has it.

    python -m bench.bench_train --reference_code DIR [--reference_python PY]   runs DIR/train.py
    python -m bench.bench_infer --reference_code DIR [--reference_python PY]   runs DIR/inference.py

PY is an interpreter with that code's own stack (transformers 4.x, peft, accelerate; the default is this
interpreter, whose transformers 5 that code may not run under). None of that code is part of this project:
this module writes the inputs it reads and reads the outputs it writes, nothing else.

Neither script reports per step or per prompt, so each runs a short and a long run of the same command
(after one short run that warms the page cache, discarded), and its rate is the extra work over the extra
wall time: start-up, loading and saving cancel out. Its peak RSS is the longer run's.
- train.py reads one JSON list of {"conversation": [messages], "label"} (its ConversationDataset), builds
  the chat template's prompt + label + eos itself, and loads its tokenizer with use_fast=False, which needs
  vocab.json and merges.txt beside tokenizer.json (`write_slow_tokenizer_files`);
- inference.py reads one prompt a line (--prompts_file, so a question's line breaks become spaces) and writes
  {"results": [{"prompt", "response"}]} (--output_file); it samples (temperature 0.7, top-p 0.9) in fp16 as
  it ships, up to --max_length new tokens (its generate call's max_length is the prompt's length plus that).

A differenced rate carries the noise of two wall times over a smaller difference, and the benchmarks'
`fastest()` keeps each side's highest repeat, so that noise leans in the baseline's favour.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ncal_core.data.rows import Example


def code_script(folder: Path, script: str) -> Path:
    """folder/script, or a one-line exit naming the flag."""
    path = folder / script
    if not path.is_file():
        raise SystemExit(f"--reference_code {folder}: no {script} there; give the paper's code/ folder")
    return path


def write_slow_tokenizer_files(folder: Path) -> None:
    """vocab.json and merges.txt from folder/tokenizer.json's byte-level BPE, as a slow tokenizer loads them;
    a file the folder has already is kept (a user's model folder keeps its own)."""
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{folder}/tokenizer.json: a slow tokenizer needs a BPE model, not {model.get('type')}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    texts = {"vocab.json": json.dumps(model["vocab"], ensure_ascii=False),
             "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n"}
    for name, text in texts.items():
        if not (folder / name).exists():
            (folder / name).write_text(text, encoding="utf-8")


def write_conversations(examples: list[Example], path: Path) -> None:
    """The rows as train.py's dataset: one JSON list of {"conversation", "label"}."""
    rows = [{"conversation": [{"role": m["role"], "content": m["content"]} for m in e.messages], "label": e.label}
            for e in examples]
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")


def as_flags(settings: dict[str, Any]) -> list[str]:
    """{"lora_r": 8, ...} as ["--lora_r", "8", ...]."""
    return [arg for name, value in settings.items() for arg in (f"--{name}", str(value))]


def train_command(python: str, code: Path, model: Path, data: Path, out_dir: Path, labels: list[str], batch: int,
                  steps: int, dtype: str, training: dict[str, float]) -> list[str]:
    """train.py on `data` for `steps` optimizer steps on the CPU with LoRA on q/k/v/o and TC on, weights in dtype,
    no mixed precision, accumulation, saving of checkpoints or trackers; `training` gives its flags by name
    (lora_r, lora_alpha, lora_dropout, lambda_lc, learning_rate, seed). --use_cpu needs transformers >= 4.32;
    the paper's code asks for >= 4.36."""
    return [python, str(code_script(code, "train.py")), "--dataset_path", str(data),
            "--model_name_or_path", str(model), "--output_dir", str(out_dir), "--label_types", *labels,
            "--torch_dtype", dtype, "--device_map", "cpu", "--use_cpu", "true", "--fp16", "false", "--bf16", "false",
            "--use_lora", "true", "--use_etf_loss", "true", *as_flags(training),
            "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "1",
            "--max_steps", str(steps), "--save_strategy", "no", "--report_to", "none",
            "--remove_unused_columns", "false", "--dataloader_drop_last", "true"]


def write_prompts(questions: list[str], path: Path) -> None:
    """inference.py's --prompts_file: one question a line, its own line breaks turned into spaces."""
    path.write_text("".join(" ".join(q.split("\n")).strip() + "\n" for q in questions), encoding="utf-8")


def inference_command(python: str, code: Path, model: Path, prompts: Path, out: Path, max_length: int) -> list[str]:
    """inference.py over the prompts file, at its shipped sampling settings, at most max_length new tokens."""
    return [python, str(code_script(code, "inference.py")), "--model_path", str(model), "--prompts_file",
            str(prompts), "--output_file", str(out), "--max_length", str(max_length)]


def read_responses(path: Path, count: int) -> list[str]:
    """The responses of inference.py's output file, in the prompts' order; it must hold `count` of them."""
    results = json.loads(path.read_text(encoding="utf-8"))["results"]
    if len(results) != count:
        raise RuntimeError(f"{path}: {len(results)} responses for {count} prompts")
    return [r["response"].strip() for r in results]


def differenced_runs(run: Callable[[int], dict[str, Any]], short: int,
                     long: int) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """run(short), discarded, then run(long) and run(short) again: units per second between the two measured runs,
    and those runs. The first run pays the cold start (files not yet in the page cache, first imports), which
    would otherwise shrink the difference and overstate the rate."""
    run(short)
    measured_long = run(long)
    measured_short = run(short)
    return differenced_rate(measured_short, measured_long, short, long), measured_short, measured_long


def differenced_rate(short: dict[str, Any], long: dict[str, Any], work_short: float, work_long: float) -> float:
    """Work per second between two runs of one command: (work_long - work_short) / (wall_long - wall_short)."""
    extra = long["wall_s"] - short["wall_s"]
    if work_long <= work_short or extra <= 0:
        raise RuntimeError(f"the longer run ({work_long:g} units, {long['wall_s']:.1f} s) must do more work and take "
                           f"longer than the shorter ({work_short:g}, {short['wall_s']:.1f} s)")
    return (work_long - work_short) / extra
