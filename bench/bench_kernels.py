"""The TC-loss Triton kernels: a compile-only resource report, GPU timings, or (no GPU) an interpreter error table.

    python -m bench.bench_kernels --compile-only --arch sm_80,sm_90 [--json PATH]
        compiles every specialisation the launchers can launch; prints registers, spills and shared
        memory per kernel; exits 1 on any compile failure or spill.
    python -m bench.bench_kernels [--json PATH]
        on a CUDA GPU: fused Triton vs eager PyTorch vs torch.compile, forward + backward, at
        Qwen2.5-0.5B/7B shapes; without one: says so and runs a small interpreter correctness pass.

Kernels are imported inside the modes: whether Triton interprets them is fixed when they are
defined, so each mode sets TRITON_INTERPRET first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ncal_kernels.spec import KernelSpec

RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
# Qwen2.5-0.5B and 7B hidden sizes; (B, T) from short to long prompts.
GPU_SHAPES = [(H, B, T) for H in (896, 3584) for B, T in ((8, 2048), (32, 512), (128, 128), (128, 2048))]
COMPILE_COLUMNS = [
    "kernel",
    "arch",
    "align",
    "num_warps",
    "num_stages",
    "registers",
    "stack",
    "local",
    "shared",
    "spills",
    "ok",
    "error",
]
TIMING_COLUMNS = ["pooling", "H", "B", "T", "impl", "ms", "GB/s", "% copy BW"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-only", action="store_true", help="compile for --arch and report resources")
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated CUDA archs, e.g. sm_80,sm_90")
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"sm_\d{2,3}(,sm_\d{2,3})*", args.arch):
        parser.error(f"--arch must look like sm_80,sm_90, got {args.arch!r}")
    return args


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Rows as a left-aligned text table."""
    cells = [[c for c in columns]] + [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def kernel_specs() -> list[KernelSpec]:
    """Every KernelSpec the launchers can launch: the one list both the launchers and this report use."""
    from ncal_kernels import etf_gram, pool_norm

    return pool_norm.all_specs() + etf_gram.all_specs()


def parse_res_usage(text: str) -> dict[str, int]:
    """Registers, stack, static shared and local bytes from `cuobjdump -res-usage` of one kernel."""
    match = RES_USAGE.search(text)
    if match is None:
        raise ValueError(f"no resource line in cuobjdump output: {text[:200]!r}")
    regs, stack, shared, local = map(int, match.groups())
    return {
        "registers": regs,
        "stack": stack,
        "static_shared": shared,
        "local": local,
        "spills": stack > 0 or local > 0,
    }


def divisibility(spec: KernelSpec, aligned: bool) -> dict[tuple[int], list]:
    """Triton's argument attributes: none, or every pointer and int divisible by 16 (the JIT's two extremes)."""
    types = spec.signature().values()
    return {(i,): [["tt.divisibility", 16]] for i, t in enumerate(types) if aligned and (t[0] == "*" or t == "i32")}


def compile_report(archs: list[int]) -> list[dict[str, Any]]:
    """Compile every spec for every arch, unaligned and 16-aligned; one row each with resources or the error."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.errors import TritonError

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    rows = []
    for spec, arch, aligned in itertools.product(kernel_specs(), archs, (False, True)):
        row: dict[str, Any] = {
            "kernel": spec.name,
            "arch": f"sm_{arch}",
            "align": 16 if aligned else 1,
            "num_warps": spec.num_warps,
            "num_stages": spec.num_stages,
        }
        try:
            kernel = triton.compile(
                ASTSource(spec.fn, spec.signature(), spec.constexprs, divisibility(spec, aligned)),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
            )
        # Triton's own errors and MLIR pass failures (RuntimeError) go in the table and the exit code.
        except (TritonError, RuntimeError) as err:
            rows.append({**row, "ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "kernel.cubin"
            cubin.write_bytes(kernel.asm["cubin"])
            usage = subprocess.run(
                [str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True, check=True
            ).stdout
        res = parse_res_usage(usage)
        rows.append({**row, **res, "shared": kernel.metadata.shared, "ok": not res["spills"], "error": None})
    return rows


def _batch(B: int, T: int, H: int, dtype: torch.dtype, device: str, seed: int = 0):
    """hidden [B, T, H], a right-padded mask [B, T] with lengths in [T/2, T], class ids [B] over 8 classes."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, device=device).to(dtype)
    lengths = torch.randint(max(T // 2, 1), T + 1, (B,), generator=g, device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    return hidden, mask, torch.randint(0, 8, (B,), generator=g, device=device)


def _forward_backward(
    fn: Callable, hidden: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, pooling: str
) -> tuple[torch.Tensor, ...]:
    """One training-like step of a TC-loss implementation: the loss and its gradient w.r.t. hidden."""
    return torch.autograd.grad(fn(hidden, mask, y, pooling), hidden)


def timing_report() -> list[dict[str, Any]]:
    """Forward + backward time of the three implementations on a CUDA GPU, with effective bandwidth."""
    os.environ.pop("TRITON_INTERPRET", None)
    from ncal_kernels.etf_gram import etf_gram
    from ncal_kernels.pool_norm import pool_norm
    from triton.testing import do_bench

    from ncal_core.loss import tc

    e_w, mu = 1.0, -1.0 / 7

    # Validation (host syncs) left out of all three: the computation alone is compared.
    def fused(h, mask, y, pooling):
        return etf_gram(pool_norm(h, mask, pooling == "mean", e_w), y, mu, True)

    def eager(h, mask, y, pooling):
        return tc._gram_torch(tc._pool_torch(h, mask, pooling, e_w), y, mu, True)

    impls = {"triton": fused, "eager": eager, "torch.compile": torch.compile(eager, dynamic=False)}
    src = torch.empty(2**28, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 2 / do_bench(lambda: dst.copy_(src), return_mode="median") / 1e6
    rows = []
    for H, B, T in GPU_SHAPES:
        hidden, mask, y = _batch(B, T, H, torch.bfloat16, "cuda")
        hidden.requires_grad_()
        for pooling in ("last", "mean"):
            read_tokens = B if pooling == "last" else int(mask.sum())
            # Least traffic: read the pooled tokens once, write the dense grad_hidden once.
            nbytes = (read_tokens + B * T) * H * hidden.element_size()
            for name, fn in impls.items():
                ms = do_bench(partial(_forward_backward, fn, hidden, mask, y, pooling), return_mode="median")
                gbs = nbytes / ms / 1e6
                rows.append(
                    dict(zip(TIMING_COLUMNS, (pooling, H, B, T, name, ms, gbs, 100 * gbs / copy_gbs), strict=True))
                )
    print(f"{torch.cuda.get_device_name()}: measured device copy bandwidth {copy_gbs:.0f} GB/s (the 'peak' below)")
    return rows


def interpreter_report() -> list[dict[str, Any]]:
    """Max differences of the Triton path (CPU interpreter) from the torch path on a few small batches."""
    os.environ["TRITON_INTERPRET"] = "1"
    from ncal_core.loss.tc import etf_gram_loss, pool_features

    cases = [
        ("last", torch.float32, 7, 9, 96, 1.0),
        ("mean", torch.bfloat16, 33, 6, 64, 0.5),
        ("mean", torch.float16, 4, 5, 256, 40.0),
        ("last", torch.float32, 130, 3, 32, 1.0),
    ]
    rows = []
    for pooling, dtype, B, T, H, e_w in cases:
        hidden, mask, y = _batch(B, T, H, dtype, "cpu", seed=B)
        out = {}
        for backend in ("torch", "triton"):
            x = hidden.clone().requires_grad_()
            z = pool_features(x, mask, pooling, e_w, backend)
            loss = etf_gram_loss(z, y, 8, e_w, True, backend)
            loss.backward()
            out[backend] = (z.detach(), loss.detach(), x.grad.float())
        (z, loss, grad), (z_ref, loss_ref, grad_ref) = out["triton"], out["torch"]
        rows.append(
            {
                "pooling": pooling,
                "dtype": str(dtype).removeprefix("torch."),
                "B": B,
                "T": T,
                "H": H,
                "e_w": e_w,
                "max|dz|": (z - z_ref).abs().max().item(),
                "rel dloss": ((loss - loss_ref).abs() / loss_ref.abs().clamp_min(1e-30)).item(),
                "max|dgrad|/max|grad|": ((grad - grad_ref).abs().max() / grad_ref.abs().max()).item(),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the chosen mode, print its table, write JSON; exit 1 when a compile fails or spills."""
    args = parse_args(argv)
    if args.compile_only:
        mode, rows = "compile-only", compile_report([int(a.removeprefix("sm_")) for a in args.arch.split(",")])
        print_table(rows, COMPILE_COLUMNS)
        bad = [r for r in rows if not r["ok"]]
        print(f"{len(rows)} compiled kernels, {len(bad)} failed or spilled")
    elif torch.cuda.is_available():
        mode, rows, bad = "gpu-timings", timing_report(), []
        print_table(rows, TIMING_COLUMNS)
    else:
        print("No CUDA GPU here: no timings measured. Running the small interpreter correctness pass instead.")
        mode, rows, bad = "interpreter-correctness", interpreter_report(), []
        print_table(rows, list(rows[0]))
    if args.json:
        args.json.write_text(json.dumps({"mode": mode, "rows": rows}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
