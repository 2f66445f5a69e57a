"""Where a training run's peak RSS goes, phase by phase, against the memory model's floor.

    python -m bench.memory_profile [--model Qwen2.5-0.5B|Qwen2.5-1.5B|bench] [--dtype float32|bfloat16]
        [--steps 3] [--threads 2] [--json PATH] [--workdir DIR] [--variant NAME=FLAGS ...]

Trains bench_train.py's shape `qwen` (a random model of --model's architecture, Qwen's tokenizer, TMWPL rows,
LoRA r 8 on q/k/v/o, TC lambda 1, batch 8, the widest batch first; the default's 10% development split held
out and evaluated after training) with `python -m ncal_core.train` under
bench/memory_probe.py, which records each phase: the imports, loading the weights, the rest of setup, each
step's forward and its backward + update (RSS after, high-water mark during, anonymous and file-backed), the
tensors autograd saved, and what glibc's allocator held at the end. The run's kernel high-water mark as a
whole is the largest of the phases' marks and ru_maxrss (as bench_train.py reports it; resetting VmHWM resets
the mark it is taken from).

The floor is the memory model's (bench/memory_model.py) for the widest step's real tokens in the weights'
dtype: every parameter, the LoRA factors with their gradients and AdamW moments, and the activations one
step keeps for its backward (computed). The target of the speed issue is 1.3x that floor.

Each --variant NAME="FLAGS" runs again with those train flags added (for example
--variant checkpointing="--gradient_checkpointing true").
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from bench import memory_model
from bench.bench_train import (
    ARCHS,
    DTYPES,
    LORA_R,
    REPO,
    prepare_shape,
    print_table,
    run_and_write,
    run_measured,
    train_flags,
)
from ncal_core.data.registry import resolve_dataset
from ncal_core.model.qwen import ModelConfig

MIB = 2**20
TARGET = 1.3
BATCH = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(ARCHS), default="Qwen2.5-0.5B")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (the first is the widest batch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "memory_profile.json")
    parser.add_argument("--workdir", type=Path, help="keep the checkpoint and logs here (default: a temporary folder)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="also run with these train flags added")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    args = parser.parse_args(argv)
    for spec in args.variant:
        if "=" not in spec:
            parser.error(f"--variant {spec!r}: expected NAME=FLAGS")
    return args


def floor(arch: ModelConfig, probe: dict[str, Any], act_bytes: int) -> dict[str, float]:
    """The memory model's terms for the probe's widest step, MiB: the base weights as loaded and LoRA + AdamW as
    the run holds them, the activations computed for that step's real tokens."""
    widest = max(probe["steps"], key=lambda s: s["tokens"])
    terms = {"weights_mb": probe["weights"]["bytes"] / MIB,  # loaded before LoRA is added
             "lora_and_adamw_mb": 16 * probe["trainable"]["parameters"] / MIB,
             "activations_mb": arch.num_hidden_layers * memory_model.layer_activation_bytes(
                 arch, 1, widest["tokens"], LORA_R, act_bytes) / MIB}
    terms["floor_mb"] = sum(terms.values())
    terms["target_mb"] = TARGET * terms["floor_mb"]
    terms["widest_step_tokens"] = widest["tokens"]
    return terms


def phase_rows(name: str, probe: dict[str, Any], maxrss_mb: float) -> list[dict[str, Any]]:
    """One table row per phase of one run, and one for the whole run: the largest of the phases' marks and the
    kernel's ru_maxrss (resetting VmHWM resets the mark ru_maxrss is taken from, so alone it holds only the
    mark since the last phase began)."""
    rows = [{"run": name, "phase": "imports", **probe["imports"]},
            {"run": name, "phase": "load weights", **probe["load_weights"]},
            {"run": name, "phase": "rest of setup", **probe["rest_of_setup"]}]
    for i, step in enumerate(probe["steps"], start=1):
        rows.append({"run": name, "phase": f"step {i} forward ({step['tokens']} tokens)", **step["forward"],
                     "saved_mb": step["saved_activation_mb"]})
        rows.append({"run": name, "phase": f"step {i} backward + update", **step["backward_and_update"]})
    rows.append({"run": name, "phase": "final evaluation and saving", **probe["finish"]})
    peak_mb = max([maxrss_mb] + [row["peak_mb"] for row in rows])
    rows.append({"run": name, "phase": "the whole run; RSS after malloc_trim",
                 "rss_mb": probe["malloc_trim"]["rss_after_mb"], "peak_mb": peak_mb})
    return rows


def run_variant(name: str, flags: list[str], shape: Any, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One probed training run; its phases, the floor and the peak against it."""
    out = workdir / f"probe-{name}.json"
    cmd = [sys.executable, "-m", "bench.memory_probe", str(out),
           *train_flags(shape, BATCH, args.steps, workdir / f"run-{name}", flags)]
    proc = run_measured(cmd, workdir / f"probe-{name}", args.threads, args.timeout)
    probe = json.loads(out.read_text())
    terms = floor(shape.arch, probe, DTYPES[args.dtype].itemsize)
    widest = max(probe["steps"], key=lambda s: s["tokens"])
    phases = phase_rows(name, probe, proc["peak_rss_mb"])
    peak = phases[-1]["peak_mb"]
    summary = {"run": name, "flags": " ".join(flags), "peak_rss_mb": peak, "ru_maxrss_mb": proc["peak_rss_mb"], **terms,
               "peak_over_floor": peak / terms["floor_mb"],
               "saved_activations_mb": widest["saved_activation_mb"],
               "framework_mb": probe["imports"]["rss_mb"],
               "allocator_held_mb": probe["malloc_trim"]["rss_before_mb"] - probe["malloc_trim"]["rss_after_mb"],
               "wall_s": proc["wall_s"]}
    return {"summary": summary, "phases": phases, "probe": probe}


def profile(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    arch = ARCHS[args.model]
    shape = prepare_shape("qwen", arch, args.dtype, workdir, resolve_dataset("tmwpl", "train"), None)
    variants = {"default": [], **{spec.split("=", 1)[0]: shlex.split(spec.split("=", 1)[1]) for spec in args.variant}}
    runs = [run_variant(name, flags, shape, args, workdir) for name, flags in variants.items()]
    print_table(f"{args.model} shapes, {args.dtype}, batch {BATCH}, {args.threads} threads: phases (MiB; peak = "
                "the high-water mark during the phase)",
                [row for run in runs for row in run["phases"]],
                ["run", "phase", "rss_mb", "peak_mb", "anon_mb", "file_mb", "saved_mb"])
    print_table(f"peak RSS against the memory model's floor (computed for the widest step; target {TARGET}x)",
                [run["summary"] for run in runs],
                ["run", "peak_rss_mb", "floor_mb", "peak_over_floor", "weights_mb", "activations_mb",
                 "saved_activations_mb", "framework_mb", "allocator_held_mb"])
    return {"model": args.model, "dtype": args.dtype, "batch": BATCH, "steps": args.steps, "threads": args.threads,
            "torch": torch.__version__, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_and_write(args.json, args.workdir, lambda workdir: profile(args, workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
