"""The fused Triton kernels, run by Triton's CPU interpreter, against the plain-PyTorch TC loss: values and gradients.

Triton decides when a kernel is defined whether it is interpreted, so another test module that
imports the kernels first would fix the mode for this whole pytest process. The cases therefore
run in one fresh subprocess with TRITON_INTERPRET=1 (this file run as a script), and pytest
checks each case's verdict from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

import pytest
import torch

# The reference is backend="torch" on the same inputs (checked by gradcheck in test_tc.py).
# (atol, rtol) per hidden dtype and output; atol is relative to the largest |reference| entry,
# because e_w = 40 puts the loss near 1e6 and the gradients near 1e2.
TOLERANCES = {
    # fp32 sums in another order (tiles of 8 tokens, 16-32 wide tl.dot steps): a few ulp.
    "float32": {"z": (1e-6, 1e-5), "loss": (1e-6, 1e-5), "grad": (1e-5, 1e-4)},
    # z and the loss are fp32 from the same bf16 inputs; grad_hidden is rounded to bf16, and the
    # interpreter truncates where PyTorch rounds to nearest: up to 2 bf16 ulp (2^-7 relative).
    "bfloat16": {"z": (1e-6, 1e-5), "loss": (1e-6, 1e-5), "grad": (1e-4, 1.6e-2)},
    "float16": {"z": (1e-6, 1e-5), "loss": (1e-6, 1e-5), "grad": (1e-5, 2e-3)},
}


@dataclass(frozen=True)
class Case:
    """One comparison: a batch of hidden states [B, T, H], its mask layout and the loss settings."""

    name: str
    dtype: str
    B: int
    T: int
    H: int
    K: int
    pooling: str = "last"
    class_diff: bool = True
    e_w: float = 1.0
    layout: str = "right"  # right- or left-padded rows, or marks with holes ("holes")
    one_class: bool = False


# Every listed value of B, H, K, e_w, pooling, pair mode and dtype appears at least once,
# not the cartesian product: the interpreter runs ~0.1-3 s per case. B = 20 and 24 reach the
# 32-row Gram tile, which the listed B values skip.
CASES = [
    Case("B1_last", "float32", 1, 5, 64, 2),
    Case("B2_mean_allpairs_bf16", "bfloat16", 2, 9, 96, 2, "mean", False, 0.5, "left"),
    Case("B7_H896_last_ew40", "float32", 7, 13, 896, 7, "last", False, 40.0, "holes"),
    Case("B7_mean_K8_bf16", "bfloat16", 7, 11, 64, 8, "mean", True, 1.0, "holes"),
    Case("B33_mean_ew05", "float32", 33, 17, 96, 8, "mean", True, 0.5),
    Case("B33_H896_last_bf16", "bfloat16", 33, 7, 896, 7, "last", True, 1.0, "left"),
    Case("B64_H3584_last", "float32", 64, 20, 3584, 8, "last", True, 1.0),
    Case("B64_H3584_mean_allpairs_bf16", "bfloat16", 64, 12, 3584, 7, "mean", False, 0.5),
    Case("B2_H3584_mean_ew40", "float32", 2, 6, 3584, 2, "mean", True, 40.0, "left"),
    Case("B64_last_allpairs_ew40_bf16", "bfloat16", 64, 12, 96, 2, "last", False, 40.0, "holes"),
    Case("B24_mean_fp16", "float16", 24, 9, 96, 7, "mean", True, 1.0, "holes"),
    Case("B20_last_allpairs", "float32", 20, 5, 64, 7, "last", False, 1.0),
    Case("one_class_last", "float32", 7, 9, 64, 7, "last", True, 1.0, one_class=True),
    Case("one_class_mean_bf16", "bfloat16", 33, 6, 96, 8, "mean", True, 0.5, one_class=True),
]
GRAM_ONLY = [("B512_gram_classdiff", True), ("B512_gram_allpairs", False)]
LAUNCHED = "launched specialisations"


def _batch(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [B, T, H] (NaN where unmarked), mask [B, T] and class_ids [B]; row norms straddle e_w."""
    g = torch.Generator().manual_seed(case.B * 1000 + case.H)
    scale = case.e_w * 10 ** (torch.rand(case.B, 1, 1, generator=g) * 2 - 1)
    hidden = torch.randn(case.B, case.T, case.H, generator=g) * scale / case.H**0.5
    lengths = torch.randint(1, case.T + 1, (case.B,), generator=g)
    positions = torch.arange(case.T)[None, :]
    mask = positions < lengths[:, None]
    if case.layout == "left":
        mask = mask.flip(1)
    elif case.layout == "holes":
        mask = mask & (torch.rand(case.B, case.T, generator=g) < 0.7)
        mask[torch.arange(case.B), lengths - 1] = True
    hidden[~mask] = float("nan")  # never read: NaN would show up in z, the loss or the gradient
    # Every class present as far as B allows, so small batches still have pairs of different classes.
    class_ids = torch.full((case.B,), 3) if case.one_class else torch.randperm(case.B, generator=g) % case.K
    return hidden.to(getattr(torch, case.dtype)), mask.to(torch.long), class_ids


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: tuple[float, float]) -> str | None:
    """None when got matches want within (atol relative to max|want|, rtol), else a one-line reason."""
    atol, rtol = tol
    scale = want.abs().max().item() if want.numel() else 0.0
    try:
        torch.testing.assert_close(got.float(), want.float(), atol=atol * max(scale, 1e-30), rtol=rtol)
    except AssertionError as err:
        return f"{name}: " + " ".join(str(err).split())
    return None


def _run_case(case: Case) -> list[str]:
    """Failures of the Triton path against the torch path on one case (empty when it matches)."""
    from ncal_core.loss.tc import etf_gram_loss, pool_features

    hidden, mask, class_ids = _batch(case)
    out = {}
    for backend in ("torch", "triton"):
        x = hidden.clone().requires_grad_()
        z = pool_features(x, mask, case.pooling, case.e_w, backend)
        loss = etf_gram_loss(z, class_ids, case.K, case.e_w, case.class_diff, backend)
        loss.backward()
        out[backend] = (z.detach(), loss.detach(), x.grad)
    tol = TOLERANCES[case.dtype]
    failures = [
        _close(name, got, want, tol[name])
        for name, got, want in zip(("z", "loss", "grad"), out["triton"], out["torch"], strict=True)
    ]
    z, loss, grad = out["triton"]
    if z.dtype != torch.float32 or grad.dtype != hidden.dtype:
        failures.append(f"dtypes: z {z.dtype}, grad {grad.dtype}")
    if not (torch.isfinite(z).all() and torch.isfinite(loss) and torch.isfinite(grad).all()):
        failures.append("non-finite z, loss or gradient")
    read = mask != 0
    if case.pooling == "last":
        last = torch.where(read, torch.arange(case.T), -1).amax(1)
        read = torch.zeros_like(read)
        read[torch.arange(case.B), last] = True
    if (grad[~read] != 0).any():
        failures.append("gradient written where pooling did not read")
    if case.one_class and (loss.item() != 0.0 or (grad != 0).any()):
        failures.append(f"one-class batch: want loss 0 and a zero gradient, got loss {loss.item()}")
    return [f for f in failures if f]


def _run_gram_only(class_diff: bool) -> list[str]:
    """B = 512 (8 x 8 tiles of 64) on the Gram loss alone, fp32 z [512, 64]."""
    from ncal_core.loss.tc import etf_gram_loss

    g = torch.Generator().manual_seed(512)
    z = torch.nn.functional.normalize(torch.randn(512, 64, generator=g), dim=1)
    class_ids = torch.randint(0, 8, (512,), generator=g)
    out = {}
    for backend in ("torch", "triton"):
        x = z.clone().requires_grad_()
        loss = etf_gram_loss(x, class_ids, 8, 1.0, class_diff, backend)
        loss.backward()
        out[backend] = (loss.detach(), x.grad)
    tol = TOLERANCES["float32"]
    failures = [
        _close(n, got, want, tol[n]) for n, got, want in zip(("loss", "grad"), out["triton"], out["torch"], strict=True)
    ]
    return [f for f in failures if f]


def _worker() -> None:
    """Run every case under the interpreter; print {case name: [failures], LAUNCHED: [spec names]} as JSON."""
    from ncal_kernels.spec import KernelSpec

    launched = set()
    launch = KernelSpec.launch

    def recording_launch(spec: KernelSpec, grid: tuple[int, ...], *args) -> None:
        launched.add(spec.name)
        launch(spec, grid, *args)

    KernelSpec.launch = recording_launch
    results = {case.name: _run_case(case) for case in CASES}
    results.update({name: _run_gram_only(class_diff) for name, class_diff in GRAM_ONLY})
    print(json.dumps({**results, LAUNCHED: sorted(launched)}))


@pytest.fixture(scope="module")
def verdicts() -> dict[str, list[str]]:
    """The subprocess's failures per case."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, __file__], check=False, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", [c.name for c in CASES] + [n for n, _ in GRAM_ONLY])
def test_triton_path_matches_torch_path_in_value_and_gradient(name, verdicts):
    assert name in verdicts, f"the interpreter run did not report {name}"
    assert verdicts[name] == [], "; ".join(verdicts[name])


@pytest.mark.slow
def test_the_cases_launch_every_compiled_specialisation_and_no_other(verdicts):
    from ncal_kernels import etf_gram, pool_norm

    assert set(verdicts[LAUNCHED]) == {s.name for s in pool_norm.all_specs() + etf_gram.all_specs()}


def test_case_grid_covers_every_required_value():
    seen = {
        k: {asdict(c)[k] for c in CASES} for k in ("B", "H", "K", "e_w", "pooling", "class_diff", "dtype", "layout")
    }
    assert {1, 2, 7, 33, 64} <= seen["B"] and {64, 96, 896, 3584} <= seen["H"] and {2, 7, 8} <= seen["K"]
    assert (
        {0.5, 1.0, 40.0} <= seen["e_w"] and seen["pooling"] == {"last", "mean"} and seen["class_diff"] == {True, False}
    )
    assert {"float32", "bfloat16"} <= seen["dtype"] and seen["layout"] == {"right", "left", "holes"}
    assert {c.pooling for c in CASES if c.one_class} == {"last", "mean"}


def test_launch_rejects_arguments_that_differ_from_the_compiled_spec():
    from ncal_kernels import pool_norm

    spec = pool_norm.fwd_spec(torch.bfloat16)
    z = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="hidden_ptr is torch.float32, the spec says \\*bf16"):
        spec.launch((1,), z, *[z] * 6, 4, 4, 4, 4, 1.0)
    with pytest.raises(ValueError, match="arguments for 12 parameters"):
        spec.launch((1,), z)


def test_gram_launcher_picks_the_smallest_tile_covering_the_batch():
    from ncal_kernels.etf_gram import FWD_TILES, fwd_tile

    assert [fwd_tile(b)[0] for b in (1, 16, 17, 32, 33, 64, 65, 512)] == [16, 16, 32, 32, 64, 64, 64, 64]
    assert all(t[0] >= 16 and t[1] >= 16 for t in FWD_TILES)  # tl.dot's smallest edge


if __name__ == "__main__":
    _worker()
