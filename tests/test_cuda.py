"""On a CUDA GPU: the compiled Triton kernels against the PyTorch path of the TC loss, and TC training with each.

Skipped without CUDA; `bench/gpu_check.py` runs them (`pytest -m cuda`). The kernels must be compiled, not
interpreted: Triton fixes that when they are defined, from TRITON_INTERPRET, so this module drops it before
anything imports them and checks that they are not interpreted.

Tolerances are test_kernels.TOLERANCES, which hold on the GPU with margin: fp32 tl.dot runs in IEEE fp32
(input_precision="ieee", no TF32), so the two paths differ only in summation order (a few ulp); in bf16
both round grad_hidden to nearest (the interpreter truncated, which the 2-ulp bound already covered).
Training: the tiny model, fp32, 4 steps; the losses of each step within LOSS_RTOL, the weights within
WEIGHT_ATOL (summation order in the loss and GPU atomics in the backward).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.pop("TRITON_INTERPRET", None)

from test_kernels import CASES, TOLERANCES, Case, _batch, _close  # noqa: E402
from training_runs import (  # noqa: E402
    TINY,
    command_env,
    final_weights,
    max_abs_diff,
    metrics,
    run,
    tmwpl_rows,
    write_jsonl,
)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4


def _outputs(case: Case, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, loss, grad_hidden) of one backend on the case's batch, on the GPU."""
    from ncal_core.loss.tc import etf_gram_loss, pool_features

    hidden, mask, class_ids = (t.cuda() for t in _batch(case))
    x = hidden.requires_grad_()
    z = pool_features(x, mask, case.pooling, case.e_w, backend)
    loss = etf_gram_loss(z, class_ids, case.K, case.e_w, case.class_diff, backend)
    loss.backward()
    return z.detach(), loss.detach(), x.grad


def test_kernels_are_compiled_not_interpreted():
    from ncal_kernels import etf_gram, pool_norm
    from ncal_kernels.spec import interpreted

    assert not [s.name for s in pool_norm.all_specs() + etf_gram.all_specs() if interpreted(s.fn)]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_compiled_kernels_match_torch_path_in_value_and_gradient(case):
    got, want = _outputs(case, "triton"), _outputs(case, "torch")
    tol = TOLERANCES[case.dtype]
    failures = [_close(n, g, w, tol[n]) for n, g, w in zip(("z", "loss", "grad"), got, want, strict=True)]
    assert got[2].dtype == getattr(torch, case.dtype) and torch.isfinite(got[2]).all()
    assert not [f for f in failures if f], failures


def _train(tmp_path, backend: str):
    """4 steps of the tiny model on CUDA with the given TC backend; its output folder."""
    data = write_jsonl(tmp_path / "train.jsonl", tmwpl_rows(48))
    out = tmp_path / backend
    env = command_env(tmp_path / "cache")
    env.pop("TRITON_INTERPRET", None)
    proc = run("ncal_core.train", [*TINY, "--dataset_path", data, "--eval_dataset_path", "none", "--output_dir", out,
                                   "--save_strategy", "no", "--max_steps", "4", "--logging_steps", "1",
                                   "--per_device_train_batch_size", "8", "--tc_backend", backend, "--seed", "0"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_training_with_triton_tc_matches_training_with_torch_tc(tmp_path):
    triton_run, torch_run = _train(tmp_path, "triton"), _train(tmp_path, "torch")
    got, want = metrics(triton_run), metrics(torch_run)
    assert [r["step"] for r in got] == [1, 2, 3, 4] == [r["step"] for r in want]
    for key in ("loss", "lm_loss", "tc_loss"):
        torch.testing.assert_close(torch.tensor([r[key] for r in got]), torch.tensor([r[key] for r in want]),
                                   rtol=LOSS_RTOL, atol=0)
    assert all(r["tc_loss"] > 0 for r in want)  # TC was on
    assert max_abs_diff(final_weights(triton_run), final_weights(torch_run)) <= WEIGHT_ATOL
