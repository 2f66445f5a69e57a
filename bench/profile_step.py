"""Where a LoRA training step's time goes, by kind of work, in each precision: torch.profiler over ncal_core.train.

    python -m bench.profile_step --model DIR [--threads 2] [--steps 4] [--json PATH] [-- more training flags]

Each precision trains the checkpoint folder DIR (the real Qwen2.5-0.5B of docs/real_model.md, or any Qwen folder)
with the paper's LoRA settings in 8-row steps on TMWPL, in its own process, under torch.profiler. Only the
optimizer steps after the first two are recorded (the profiler's schedule advances at every optimizer step, from a
global step hook), so loading, the first step's allocations and the warm-up are left out. Every op's self CPU time
is put in one group (GROUPS, by the op's name; the rest is `other`) and reported as a share of the recorded time;
`seconds_per_step` is the recorded ops' self time over the recorded steps (the main thread's time inside ops: the
Python between ops, and the profiler's own overhead, are left out). The precisions:
- float32: fp32 weights, no autocast;
- bf16 autocast: fp32 weights under --bf16 true (every frozen weight is cast to bf16 again at every use);
- bf16 weights + autocast: the frozen base loaded in bf16 (--torch_dtype bfloat16), LoRA factors in fp32.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.bench_train import child_env, print_table
from bench.reproduce import MODEL_BATCH, PAPER_LORA
from bench.reproduce import PRECISIONS as REPRODUCE_PRECISIONS

PRECISIONS = {"float32": REPRODUCE_PRECISIONS["fp32"], "bf16 autocast": ["--bf16", "true"],
              "bf16 weights + autocast": REPRODUCE_PRECISIONS["bf16"]}
LORA = [*PAPER_LORA, *MODEL_BATCH]
SKIPPED_STEPS = 2
# (group, pattern of the aten op names it takes), first match wins
GROUPS = [
    ("matmul", r"^aten::(mm|addmm|bmm|baddbmm)$"),
    ("dtype casts and copies", r"^aten::(copy_|_to_copy|to)$"),
    ("attention (SDPA)", r"scaled_dot_product"),
    ("LoRA dropout masks", r"^aten::(random_|bernoulli_|lt)$"),
    ("log-softmax (the head's loss)", r"log_softmax"),
    ("elementwise", r"^aten::(mul|add|add_|sub|div|pow|rsqrt|mean|silu|silu_backward|neg|cat|sum|exp|sqrt|"
                    r"addcmul_|addcdiv_|lerp_|mul_|div_|sqrt_|fill_|zero_|cos|sin|where|masked_fill)$"),
]


def group_of(op: str) -> str:
    return next((group for group, pattern in GROUPS if re.search(pattern, op)), "other")


def profile_run(model: str, steps: int, flags: list[str], out_dir: Path) -> dict[str, Any]:
    """Train SKIPPED_STEPS + steps optimizer steps in this process; the recorded steps' self CPU time per op."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    from ncal_core.train.loop import main as train

    args = ["--model_name_or_path", model, *LORA, "--max_steps", str(SKIPPED_STEPS + steps), "--logging_steps", "1",
            "--val_size", "0", "--eval_dataset_path", "none", "--save_strategy", "no", "--output_dir", str(out_dir),
            "--overwrite_output_dir", "true", *flags]
    with profile(activities=[ProfilerActivity.CPU],
                 schedule=schedule(wait=SKIPPED_STEPS - 1, warmup=1, active=steps, repeat=1)) as prof:
        hook = register_optimizer_step_post_hook(lambda *_: prof.step())
        try:
            train(args)
        finally:
            hook.remove()
    ops = {e.key: {"self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in prof.key_averages()
           if e.self_cpu_time_total > 0}
    return {"steps": steps, "ops": ops}


def summarise(name: str, run: dict[str, Any]) -> dict[str, Any]:
    total = sum(op["self_s"] for op in run["ops"].values())
    groups: dict[str, float] = {}
    for op, stats in run["ops"].items():
        groups[group_of(op)] = groups.get(group_of(op), 0.0) + stats["self_s"]
    return {"precision": name, "seconds_per_step": total / run["steps"],
            "shares": {g: groups.get(g, 0.0) / total for g in [*(g for g, _ in GROUPS), "other"]},
            "top_ops": sorted(({"op": k, **v} for k, v in run["ops"].items()), key=lambda o: -o["self_s"])[:12]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Qwen checkpoint folder")
    parser.add_argument("--steps", type=int, default=4, help="recorded optimizer steps of each precision")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # profile one precision, write its ops here
    parser.add_argument("extra", nargs="*", help="more flags for every training run, after --")
    args = parser.parse_args(argv)
    if args.child is not None:
        with tempfile.TemporaryDirectory() as tmp:
            args.child.write_text(json.dumps(profile_run(args.model, args.steps, args.extra, Path(tmp) / "run")))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in PRECISIONS.items():
            out = Path(tmp) / "ops.json"
            cmd = [sys.executable, "-m", "bench.profile_step", "--model", args.model, "--steps", str(args.steps),
                   "--child", str(out), "--", *flags, *args.extra]
            subprocess.run(cmd, check=True, env=child_env(args.threads), stdout=subprocess.DEVNULL)
            rows.append(summarise(name, json.loads(out.read_text())))
    table = [{"precision": r["precision"], "s/step": round(r["seconds_per_step"], 2),
              **{g: f"{100 * s:.0f}%" for g, s in r["shares"].items()}} for r in rows]
    print_table(f"Self CPU time per recorded step and its shares ({args.threads} threads)", table, list(table[0]))
    if args.json:
        args.json.write_text(json.dumps({"model": Path(args.model).name, "threads": args.threads, "steps": args.steps,
                                         "extra_flags": args.extra, "precisions": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
