"""bench/bench_kernels.py: compile-only for sm_80 and sm_90, the no-GPU interpreter pass, and the spill test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import bench_kernels

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    # The bench sets TRITON_INTERPRET itself per mode; start it from a clean environment either way.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "bench.bench_kernels", *args], check=False, env=env, capture_output=True, text=True,
        timeout=timeout, cwd=REPO
    )


@pytest.mark.slow
def test_compile_only_builds_every_launchable_kernel_for_sm80_and_sm90_without_spills(tmp_path):
    # The full set, not a subset: 14 specialisations x 2 archs x 2 alignments compile in ~15 s here.
    out = _run("--compile-only", "--arch", "sm_80,sm_90", "--json", str(tmp_path / "c.json"), timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    names = {spec.name for spec in bench_kernels.kernel_specs()}
    expected = {(n, arch, align) for n in names for arch in ("sm_80", "sm_90") for align in (1, 16)}
    assert {(r["kernel"], r["arch"], r["align"]) for r in rows} == expected
    assert all(r["ok"] and 0 < r["registers"] <= 255 and not r["spills"] for r in rows)
    # Each hidden dtype has its pooling kernels, and every Gram tile the launcher can pick is there.
    for dtype in ("fp32", "bf16", "fp16"):
        assert sum(f";{dtype}," in n and ("_pool_norm_fwd" in n or "_spread_bwd" in n) for n in names) == 2
    assert {n.split("BLOCK_B=")[1].split(",")[0] for n in names if "_gram_fwd" in n} == {"16", "32", "64"}
    assert "0 failed or spilled" in out.stdout


def test_without_a_gpu_the_benchmark_says_so_and_reports_interpreter_errors_not_timings(tmp_path):
    out = _run("--json", str(tmp_path / "i.json"), timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "i.json").read_text())
    assert "No CUDA GPU here: no timings measured" in out.stdout
    assert report["mode"] == "interpreter-correctness"
    assert all("ms" not in row for row in report["rows"])
    assert all(row["max|dz|"] < 1e-5 and row["max|dgrad|/max|grad|"] < 2e-2 for row in report["rows"])


def test_a_stack_frame_or_local_memory_counts_as_a_spill():
    parse = bench_kernels.parse_res_usage
    assert parse(" Function k:\n  REG:64 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:424")["spills"] is False
    assert parse("  REG:255 STACK:8 SHARED:0 LOCAL:0")["spills"] is True
    assert parse("  REG:255 STACK:0 SHARED:0 LOCAL:16")["spills"] is True
    with pytest.raises(ValueError, match="no resource line"):
        parse("cuobjdump: no cubin")
