"""One training step at a Qwen2.5 model's shapes, in 1 process or sharded by FSDP2 over several, its memory measured
per process and set against bench/memory_model.py's per_gpu prediction.

    python -m bench.scale_check [--model Qwen2.5-0.5B] [--layers 2] [--runs lora:1 lora:2 qlora:1 ...]
        [--batch 2] [--seq 64] [--json PATH] [--device cpu|cuda]
    python -m bench.scale_check --table PATH   (an earlier run's JSON as a markdown table)

Each METHOD:PROCESSES run is in its own processes (torch.distributed.run for more than one): a random
model of the architecture (--layers of its decoder layers, to keep a CPU run short; the per-parameter terms do
not depend on the count), LoRA r 8 on q/k/v/o over a bf16 base (QLoRA: its linears in NF4) or full fine-tuning
in fp32, sharded by ncal_core.train.fsdp.shard_objective as `--fsdp true` does, then one step of
TrainingObjective + AdamW on random rows. Measured per process after the step: the bytes of its weights (its
shards), and of its gradients and optimizer state; the peak allocated memory of the step (CUDA) or the step's
peak RSS (bench/memory_probe.py's high-water mark, reset after sharding) above what the imports took (CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench import memory_model, memory_probe
from ncal_core.model.qwen import ModelConfig

REPO = Path(__file__).resolve().parents[1]
LORA_R = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes this process holds of t: a DTensor's local shard, an NF4 tensor's codes and scales."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t).__name__ == "NF4Tensor":
        return sum(getattr(t, name).nbytes for name in inner()[0])
    return t.numel() * t.element_size()


def build(config: ModelConfig, method: str, device: torch.device):
    """A random QwenModel of arch a (bf16 base under LoRA, fp32 for full fine-tuning), LoRA injected, NF4 for
    QLoRA, inside a TrainingObjective."""
    from ncal_core.loss.objective import TrainingObjective
    from ncal_core.model.lora import inject_lora
    from ncal_core.model.qwen import QwenModel, init_weights

    dtype = torch.float32 if method == "full" else torch.bfloat16
    model = QwenModel(config, device="cpu", dtype=dtype)
    init_weights(model, seed=0)
    if method != "full":
        model.requires_grad_(False)
        inject_lora(model, LORA_R, 2 * LORA_R, 0.0, TARGETS)
    if method == "qlora":
        from ncal_core.model.quantize import quantize_base

        quantize_base(model, shards=int(os.environ.get("WORLD_SIZE", "1")))
    objective = TrainingObjective(model)
    return objective if device.type == "cpu" else objective.to(device)


def step(objective, batch: int, seq: int, device: torch.device) -> torch.optim.Optimizer:
    """One forward, backward and AdamW update on random rows (the last 3 tokens of each the label's)."""
    from ncal_core.data.batching import collate
    from ncal_core.data.prompts import EncodedRow

    g = torch.Generator().manual_seed(int(os.environ.get("RANK", "0")))
    vocab = objective.model.config.vocab_size
    rows = [EncodedRow(torch.randint(0, vocab, (seq,), generator=g).tolist(), seq - 3, i % 2, str(i))
            for i in range(batch)]
    trainable = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = objective(collate(rows, 0).to(device))
    out.lm_sum.backward()
    optimizer.step()
    return optimizer


def measure(a: ModelConfig, method: str, batch: int, seq: int, device: torch.device) -> dict[str, Any]:
    """This process's part of one step (after torch.distributed is set up when several run)."""
    import torch.distributed as dist

    from ncal_core.train import fsdp

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    imports_mb = memory_probe.status()["rss_mb"]  # the interpreter, torch and ncal_core
    objective = build(a, method, device)
    if world > 1:
        fsdp.shard_objective(objective, device, bf16=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # the peak of the step alone: not the whole model as built before sharding, nor init's temporaries
        memory_probe.malloc_trim()
        memory_probe.reset_peak()
    optimizer = step(objective, batch, seq, device)
    params = list(objective.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
    measured = {"weights": sum(tensor_bytes(p) for p in params),
                "grads_and_adamw": sum(tensor_bytes(p.grad) for p in params if p.grad is not None)
                + sum(tensor_bytes(t) for t in state)}
    if device.type == "cuda":
        measured["peak_allocated"] = torch.cuda.max_memory_allocated(device)
    else:
        measured["peak_rss_above_imports"] = int((memory_probe.status()["peak_mb"] - imports_mb) * memory_probe.MIB)
    if world > 1:
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, measured)
        dist.destroy_process_group()
        return {"per_process": everyone}
    return {"per_process": [measured]}


def compare(a: ModelConfig, method: str, processes: int, batch: int, seq: int,
            measured: list[dict[str, int]]) -> dict[str, Any]:
    """The measured terms beside per_gpu's (fsdp2 for several processes), and their ratios."""
    predicted = memory_model.per_gpu(a, method, "fsdp2" if processes > 1 else "ddp", processes, batch, seq, LORA_R)
    if method == "full":  # measured in fp32 without autocast copies of a bf16 base: the state terms compare
        predicted = {**predicted, "autocast_copies": 0}
    worst = {k: max(m[k] for m in measured) for k in measured[0]}
    return {"method": method, "processes": processes, "measured_max_over_processes": worst,
            "predicted": {k: predicted[k] for k in ("weights", "grads_and_adamw", "fsdp_gathered", "activations",
                                                    "total")},
            "measured_over_predicted": {k: worst[k] / predicted[k] for k in ("weights", "grads_and_adamw")}}


def table(report: dict[str, Any]) -> str:
    """A scale_check JSON as a markdown table: per run, the largest process's measured MB beside the prediction."""
    lines = ["| method | processes | weights MB (predicted) | grads + AdamW MB (predicted) | peak MB (predicted) |",
             "|---|---|---|---|---|"]
    for row in report["rows"]:
        got, want = row["measured_max_over_processes"], row["predicted"]
        peak = got.get("peak_allocated", got.get("peak_rss_above_imports", 0))
        lines.append(f"| {row['method']} | {row['processes']} | {got['weights'] / 1e6:.1f} "
                     f"({want['weights'] / 1e6:.1f}) | {got['grads_and_adamw'] / 1e6:.1f} "
                     f"({want['grads_and_adamw'] / 1e6:.1f}) | {peak / 1e6:.0f} ({want['total'] / 1e6:.0f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen2.5-0.5B", choices=list(memory_model.SCALE_ARCHS))
    parser.add_argument("--layers", type=int, default=2, help="decoder layers built (default: 2, a short CPU run)")
    parser.add_argument("--runs", nargs="+", default=[f"{m}:{n}" for m in memory_model.METHODS for n in (1, 2)],
                        help="METHOD:PROCESSES pairs (default: lora, qlora and full, each in 1 and 2 processes)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", type=Path, help="write the comparisons here")
    parser.add_argument("--table", type=Path, help="only print the markdown table of an earlier run's JSON")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "OUT"), help=argparse.SUPPRESS)  # a launched run
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    a = replace(memory_model.SCALE_ARCHS[args.model], num_hidden_layers=args.layers)
    device = torch.device(args.device)
    if args.one:
        result = measure(a, args.one[0], args.batch, args.seq, device)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.one[1]).write_text(json.dumps(result))
        return 0
    rows = []
    for method, n in ((run.split(":")[0], int(run.split(":")[1])) for run in args.runs):
        out = Path(tempfile.mkdtemp(prefix="scale_check-")) / "run.json"
        launcher = [sys.executable] if n == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
        cmd = [*launcher, "-m", "bench.scale_check", "--model", args.model, "--layers", str(args.layers), "--batch",
               str(args.batch), "--seq", str(args.seq), "--device", args.device, "--one", method, str(out)]
        subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                                                                "1")})
        rows.append(compare(a, method, n, args.batch, args.seq, json.loads(out.read_text())["per_process"]))
        shutil.rmtree(out.parent)
        row = rows[-1]
        print(f"{method:5s} x{n}: weights {row['measured_max_over_processes']['weights'] / 1e6:8.1f} MB "
              f"(predicted {row['predicted']['weights'] / 1e6:8.1f}), grads+AdamW "
              f"{row['measured_max_over_processes']['grads_and_adamw'] / 1e6:8.1f} MB (predicted "
              f"{row['predicted']['grads_and_adamw'] / 1e6:8.1f})", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "layers": args.layers, "batch": args.batch,
                                         "seq": args.seq, "device": args.device, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
