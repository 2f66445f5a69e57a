"""The plain-PyTorch TC loss (backend="torch"): hand-computed values, autograd against METHOD.md section 3, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ncal_core.data.batching import collate
from ncal_core.data.prompts import EncodedRow
from ncal_core.errors import NCALError
from ncal_core.loss import tc
from ncal_core.loss.tc import (
    TCConfig,
    etf_gram_loss,
    etf_target_loss,
    pool_features,
    pool_mask,
    simplex_etf,
    tc_batch_loss,
    tc_features,
)


def tc_loss(hidden, mask, class_ids, num_classes, pooling="last", e_w=1.0, class_diff=True, backend="auto"):
    """The TC loss of hidden [B, T, H] pooled over mask [B, T]: the two steps composed, as the loop composes them."""
    return etf_gram_loss(pool_features(hidden, mask, pooling, e_w, backend), class_ids, num_classes, e_w,
                         class_diff, backend)


def _ragged_batch(B: int, T: int, H: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 hidden [B, T, H] whose row norms straddle 1, and a right-padded mask [B, T]."""
    g = torch.Generator().manual_seed(seed)
    scale = 10 ** (torch.rand(B, T, 1, generator=g, dtype=torch.float64) * 2 - 1)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64) * scale / H**0.5
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    return hidden, torch.arange(T)[None, :] < lengths[:, None]


# --- hand-computed values -------------------------------------------------------------------


def test_last_pooling_takes_the_last_marked_token_and_clamps_long_vectors():
    hidden = torch.zeros(2, 4, 3)
    hidden[0, 1] = torch.tensor([3.0, 4.0, 0.0])  # ||.|| = 5 > e_w: scaled to length 1
    hidden[1, 3] = torch.tensor([0.0, 0.6, 0.0])  # shorter than e_w: unchanged
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1]])
    z = pool_features(hidden, mask, "last", e_w=1.0, backend="torch")
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.6, 0.0]]))


def test_mean_pooling_averages_only_marked_tokens():
    hidden = torch.tensor([[[1.0, 0.0], [9.0, 9.0], [0.0, 1.0], [7.0, 7.0]]], dtype=torch.bfloat16)
    mask = torch.tensor([[True, False, True, False]])
    z = pool_features(hidden, mask, "mean", e_w=10.0, backend="torch")
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, torch.tensor([[0.5, 0.5]]))


def test_norm_clamp_uses_e_w_as_the_length_limit():
    hidden = torch.tensor([[[6.0, 8.0]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    torch.testing.assert_close(pool_features(hidden, mask, e_w=2.0, backend="torch"), torch.tensor([[1.2, 1.6]]))
    torch.testing.assert_close(pool_features(hidden, mask, e_w=40.0, backend="torch"), hidden[0])


def test_zero_vector_pools_to_zero_with_identity_gradient():
    hidden = torch.zeros(1, 2, 3, requires_grad=True)
    z = pool_features(hidden, torch.ones(1, 2, dtype=torch.long), "last", backend="torch")
    z.sum().backward()
    assert torch.equal(z, torch.zeros(1, 3))
    torch.testing.assert_close(hidden.grad[0, 1], torch.ones(3))


@pytest.mark.parametrize(
    "class_ids, class_diff, expected",
    [
        # G12 = 0.6, G13 = -1, G23 = -0.6; mu = -1 for K = 2.
        ([0, 0, 1], False, (1.6**2 + 0.0 + 0.4**2) / 3),
        ([0, 0, 1], True, (0.0 + 0.4**2) / 2),
        ([0, 1, 1], True, (1.6**2 + 0.0) / 2),
    ],
)
def test_gram_loss_is_the_mean_squared_gap_to_mu_over_masked_pairs(class_ids, class_diff, expected):
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    loss = etf_gram_loss(z, torch.tensor(class_ids), 2, class_diff=class_diff, backend="torch")
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, torch.tensor(expected))


@pytest.mark.parametrize("num_classes, e_w, expected", [(3, 2.0, (-4.0 + 2.0) ** 2), (2, 2.0, 0.0), (3, 1.0, 3.5**2)])
def test_mu_is_minus_e_w_squared_over_k_minus_1(num_classes, e_w, expected):
    z = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])  # G12 = -4
    loss = etf_gram_loss(z, torch.tensor([0, 1]), num_classes, e_w=e_w, backend="torch")
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_gram_stays_fp32_under_bf16_autocast():
    z = torch.nn.functional.normalize(torch.randn(6, 32, generator=torch.Generator().manual_seed(6)), dim=1)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    expected = etf_gram_loss(z, y, 3, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = etf_gram_loss(z, y, 3, backend="torch")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("pooling", ["last", "seq_last", "mean"])
def test_tc_features_pool_where_the_config_says_and_the_batch_loss_follows_the_variant(pooling):
    rows = [EncodedRow([5, 6, 7, 8, 2], 3, 0, "a"), EncodedRow([5, 9, 8, 2], 2, 1, "b"), EncodedRow([4, 8, 2], 1, 2, "c")]
    batch = collate(rows, pad_id=0)
    hidden = torch.randn(3, batch.input_ids.shape[1], 8, dtype=torch.float64)
    config = TCConfig(pooling=pooling, e_w=0.7, class_diff=False, backend="torch")
    z = tc_features(hidden, batch, config)
    mask = pool_mask(batch, pooling)
    # last prompt token / last real token / mean over the prompt
    assert mask.sum(1).tolist() == ([3, 2, 1] if pooling == "mean" else [3, 2, 1] if pooling == "last" else [5, 4, 3])
    expected = pool_features(hidden, mask, "mean" if pooling == "mean" else "last", e_w=0.7, backend="torch")
    torch.testing.assert_close(z, expected, rtol=0, atol=0)
    y = batch.class_ids
    torch.testing.assert_close(tc_batch_loss(z, y, 3, config),
                               etf_gram_loss(z, y, 3, e_w=0.7, class_diff=False, backend="torch"), rtol=0, atol=0)
    targets = simplex_etf(3, 8).double()
    torch.testing.assert_close(tc_batch_loss(z, y, 3, TCConfig(variant="etf_target"), targets),
                               etf_target_loss(z, y, targets), rtol=0, atol=0)


@pytest.mark.parametrize("change, message", [
    ({"pooling": "max"}, "--pooling: must be last, seq_last or mean, not 'max'"),
    ({"variant": "pair"}, "--tc_variant: must be pairs or etf_target, not 'pair'"),
    ({"backend": "cuda"}, "--tc_backend: must be auto, triton or torch, not 'cuda'"),
    ({"e_w": 0.0}, "--e_w: must be > 0, not 0.0"),
    ({"weight": -1.0}, "--lambda_lc: must be >= 0, not -1.0"),
])
def test_a_bad_setting_is_refused_naming_its_flag(change, message):
    TCConfig().check()
    with pytest.raises(NCALError) as err:
        TCConfig(**change).check()
    assert str(err.value) == message


# --- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("class_diff", [True, False])
@pytest.mark.parametrize("e_w", [0.3, 1.0, 40.0])
def test_tc_loss_passes_gradcheck_in_fp64(pooling, class_diff, e_w):
    hidden, mask = _ragged_batch(5, 4, 6, seed=1)
    hidden = (hidden * e_w).requires_grad_()  # rows on both sides of the clamp at every e_w
    y = torch.tensor([0, 1, 1, 2, 0])
    assert torch.autograd.gradcheck(
        lambda h: tc_loss(h, mask, y, 3, pooling=pooling, e_w=e_w, class_diff=class_diff, backend="torch"), (hidden,)
    )


@pytest.mark.parametrize("class_diff", [True, False])
def test_gram_gradient_matches_the_closed_form_of_method_section_3(class_diff):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (9,), generator=g)
    e_w, K = 1.5, 4
    etf_gram_loss(z, y, K, e_w=e_w, class_diff=class_diff, backend="torch").backward()
    mu = -(e_w**2) / (K - 1)
    m = ~torch.eye(9, dtype=torch.bool)
    if class_diff:
        m &= y[:, None] != y[None, :]
    pairs = m.sum().item() / 2
    with torch.no_grad():
        expected = (2 / pairs) * ((z @ z.T - mu) * m) @ z
    torch.testing.assert_close(z.grad, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_clamp_jacobian_matches_the_closed_form_of_method_section_3(scale):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(6, generator=g, dtype=torch.float64)
    h = h / h.norm() * scale  # ||h|| = scale, against e_w = 1
    jac = torch.autograd.functional.jacobian(
        lambda x: pool_features(x.view(1, 1, 6), torch.ones(1, 1, dtype=torch.bool), e_w=1.0, backend="torch")[0], h
    )
    n = h.norm()
    expected = (
        torch.eye(6, dtype=torch.float64)
        if n <= 1
        else (torch.eye(6, dtype=torch.float64) - torch.outer(h, h) / n**2) / n
    )
    torch.testing.assert_close(jac, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_gradient_reaches_only_the_tokens_pooling_read_and_padding_nan_stays_out(pooling):
    hidden, mask = _ragged_batch(4, 7, 5, seed=4)
    mask[2] = torch.tensor([False, True, True, False, True, False, False])  # holes inside a row
    hidden[~mask] = float("nan")
    hidden.requires_grad_()
    loss = tc_loss(hidden, mask, torch.tensor([0, 1, 0, 1]), 2, pooling=pooling, backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all()
    read = mask.clone()
    if pooling == "last":
        last = torch.where(mask, torch.arange(7), -1).amax(1)
        read = torch.zeros_like(mask)
        read[torch.arange(4), last] = True
    assert (hidden.grad[~read] == 0).all()
    assert (hidden.grad[read].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("class_ids", [[3, 3, 3, 3], [0]], ids=["one_class", "B=1"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_no_masked_pair_gives_exactly_zero_loss_and_gradient(class_ids, pooling):
    B = len(class_ids)
    hidden, mask = _ragged_batch(B, 3, 4, seed=5)
    hidden = hidden.float().requires_grad_()
    loss = tc_loss(hidden, mask, torch.tensor(class_ids), 5, pooling=pooling, backend="torch")
    loss.backward()
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


# --- broken internal contracts: ValueError with its traceback, not a user error ---------------


def _good() -> dict:
    return {
        "hidden": torch.randn(2, 3, 4),
        "mask": torch.ones(2, 3, dtype=torch.bool),
        "class_ids": torch.tensor([0, 1]),
        "num_classes": 2,
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_classes": 1}, "num_classes must be at least 2"),
        ({"pooling": "seq_last"}, "pooling must be last or mean"),
        ({"e_w": 0.0}, "e_w must be > 0"),
        ({"e_w": -1.0}, "e_w must be > 0"),
        ({"backend": "cuda"}, "backend must be one of"),
        ({"hidden": torch.randn(2, 4)}, "hidden must be a float tensor"),
        ({"hidden": torch.ones(2, 3, 4, dtype=torch.long)}, "hidden must be a float tensor"),
        ({"mask": torch.ones(2, 4)}, "mask must be [B, T]"),
        ({"mask": torch.ones(2, 3)}, "mask must be bool or integer"),
        ({"mask": torch.tensor([[1, 1, 0], [0, 0, 0]])},
         "mask must mark at least one token in each batch row for pooling; failing row(s): [1]"),
        ({"class_ids": torch.tensor([0, 1, 1])}, "class_ids must be integer [B]"),
        ({"class_ids": torch.tensor([0.0, 1.0])}, "class_ids must be integer [B]"),
        ({"class_ids": torch.tensor([0, 2])}, "class_ids must lie in 0..1; failing row(s): [1]"),
        (
            {
                "hidden": torch.randn(0, 3, 4),
                "mask": torch.ones(0, 3, dtype=torch.bool),
                "class_ids": torch.zeros(0, dtype=torch.long),
            },
            "hidden has no elements",
        ),
    ],
)
def test_bad_inputs_raise_value_error(change, message):
    args = {**_good(), "backend": "torch", **change}
    with pytest.raises(ValueError) as err:
        tc_loss(**args)
    assert message in str(err.value) and not isinstance(err.value, NCALError)


def test_async_checks_off_the_cpu_do_not_wait_for_the_device(monkeypatch):
    # meta tensors have no values: reading one on the host (a sync on a GPU) raises, so this passes only
    # if the row checks are left to the device (torch._assert_async) instead of being read back
    args = _good()
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    asserted = []
    monkeypatch.setattr(torch, "_assert_async", lambda ok, message: asserted.append(message))
    monkeypatch.setattr(tc, "_gram_torch", lambda z, *rest: z.sum())  # autocast has no meta device
    with pytest.raises(Exception, match="meta"):  # by default the checks read the rows back
        pool_features(meta["hidden"], meta["mask"], backend="torch")
    z = pool_features(meta["hidden"], meta["mask"], backend="torch", async_checks=True)
    assert etf_gram_loss(z, meta["class_ids"], args["num_classes"], backend="torch", async_checks=True).is_meta
    assert [m.split()[0] for m in asserted] == ["mask", "class_ids"]


def test_cpu_auto_backend_does_not_import_triton_and_forced_triton_needs_the_interpreter():
    # A fresh interpreter without TRITON_INTERPRET: this process may already hold the kernels.
    script = textwrap.dedent(
        """
        import sys, torch
        from ncal_core.loss.tc import pool_features
        args = (torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.long))
        pool_features(*args)
        assert "triton" not in sys.modules, "auto on CPU imported triton"
        try:
            pool_features(*args, backend="triton")
        except RuntimeError as err:
            print(err)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "needs TRITON_INTERPRET=1" in out.stdout


@pytest.fixture
def on_a_gpu(monkeypatch):
    """Pretend a CUDA GPU of a given compute capability is there (returns a setter)."""
    def gpu(capability: tuple[int, int], missing: str | None = None) -> torch.device:
        monkeypatch.setattr(tc.torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(tc, "_triton_missing", lambda: missing)
        return torch.device("cuda", 0)
    return gpu


def test_auto_backend_takes_triton_on_an_ampere_or_newer_gpu_and_pytorch_on_cpu(on_a_gpu):
    from ncal_core.loss.tc import resolve_backend
    assert resolve_backend("auto", on_a_gpu((9, 0))) == "triton"
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", on_a_gpu((9, 0))) == "torch"


@pytest.mark.parametrize("capability, missing, why", [
    ((9, 0), "the triton package cannot be imported (No module named 'triton')", "cannot be imported"),
    ((7, 5), None, "the GPU is sm_75, the Triton kernels need sm_80 or newer"),
])
def test_auto_backend_falls_back_to_pytorch_with_one_warning(on_a_gpu, capability, missing, why):
    from ncal_core.loss.tc import resolve_backend
    with pytest.warns(UserWarning, match=why) as caught:
        assert resolve_backend("auto", on_a_gpu(capability, missing)) == "torch"
    assert len(caught) == 1


def test_triton_backend_without_triton_is_a_one_line_error(on_a_gpu):
    from ncal_core.loss.tc import resolve_backend
    with pytest.raises(NCALError, match=r"^--tc_backend triton: the triton package cannot be imported"):
        resolve_backend("triton", on_a_gpu((9, 0), "the triton package cannot be imported (No module named 'triton')"))


def test_a_missing_triton_is_reported_not_raised(monkeypatch):
    import sys

    from ncal_core.loss.tc import _triton_missing
    monkeypatch.setitem(sys.modules, "triton", None)  # what `import triton` sees where it is not installed
    assert "the triton package cannot be imported" in _triton_missing()


@pytest.mark.parametrize("K,H", [(2, 8), (7, 64), (8, 8)])
def test_simplex_etf_has_unit_norms_and_equal_angles(K, H):
    etf = simplex_etf(K, H)
    gram = etf @ etf.T
    assert torch.allclose(gram.diagonal(), torch.ones(K), atol=1e-5)
    off = gram[~torch.eye(K, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / (K - 1)), atol=1e-5)


def test_etf_target_loss_is_zero_on_target_and_matches_autograd_formula():
    targets = simplex_etf(3, 16)
    y = torch.tensor([0, 1, 2, 1])
    assert etf_target_loss(targets[y] * 3.0, y, targets).item() == pytest.approx(0.0, abs=1e-7)
    z = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: etf_target_loss(t, y, targets.double()), (z,))
