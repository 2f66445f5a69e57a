"""Long-tail remedies: priors, adjustment, re-sampling weights, the restricted LA loss and the ETF targets."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from ncal_core.data.batching import LengthGroupedBatches
from ncal_core.errors import NCALError
from ncal_core.loss.longtail import (
    adjust_scores,
    class_counts,
    etf_target_loss,
    first_label_tokens,
    log_prior,
    logit_adjusted_loss,
    row_weights,
    simplex_etf,
)


def test_post_hoc_adjustment_subtracts_tau_log_prior():
    counts = [80, 15, 5]
    prior = torch.tensor(counts, dtype=torch.float64) / 100
    scores = torch.tensor([[-1.0, -1.2, -1.5]])
    adjusted = adjust_scores(scores, log_prior(counts), 1.0)
    assert torch.allclose(adjusted, scores - prior.log().float())
    assert adjusted.argmax().item() == 2  # the rare class wins once its prior is taken out


def test_balanced_resampling_draws_classes_about_equally():
    class_ids = [0] * 900 + [1] * 90 + [2] * 10
    sampler = LengthGroupedBatches([10] * 1000, 50, seed=1, weights=row_weights(class_ids, 3, "balanced"))
    drawn = [class_ids[i] for i in itertools.chain.from_iterable(sampler)]
    shares = torch.tensor(class_counts(drawn, 3), dtype=torch.float) / len(drawn)
    assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=0.05)
    sqrt_w = row_weights(class_ids, 3, "sqrt")
    assert sqrt_w[0] == pytest.approx(1 / 30) and sqrt_w[-1] == pytest.approx(1 / 10 ** 0.5)
    assert row_weights(class_ids, 3, "none") is None


def test_resampling_can_wait_for_the_last_epochs():
    class_ids = [0] * 95 + [1] * 5
    sampler = LengthGroupedBatches([10] * 100, 10, seed=0, weights=row_weights(class_ids, 2, "balanced"),
                                   weighted_from_epoch=2)
    sampler.set_epoch(1)
    assert sorted(itertools.chain.from_iterable(sampler)) == list(range(100))  # a plain permutation
    sampler.set_epoch(2)
    assert sum(class_ids[i] for i in itertools.chain.from_iterable(sampler)) > 25


def test_logit_adjusted_loss_equals_cross_entropy_on_shifted_restricted_logits():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 11, generator=gen)
    firsts = torch.tensor([3, 7, 1])
    y = torch.tensor([0, 2, 1, 0])
    prior = log_prior([50, 30, 20])
    expected = F.cross_entropy(logits[:, [3, 7, 1]] + 0.7 * prior, y)
    assert torch.allclose(logit_adjusted_loss(logits[:, firsts], y, prior, 0.7), expected)
    with pytest.raises(NCALError, match="start with the same token"):
        first_label_tokens([[4, 9], [4, 2], [5]], ["a", "b", "c"])


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
