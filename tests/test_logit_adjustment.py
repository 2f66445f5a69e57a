"""Logit adjustment: the prior, the post-hoc adjustment and the restricted logit-adjusted training loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ncal_core.errors import NCALError
from ncal_core.loss.logit_adjustment import adjust_scores, first_label_tokens, log_prior, logit_adjusted_loss


def test_post_hoc_adjustment_subtracts_tau_log_prior():
    counts = [80, 15, 5]
    prior = torch.tensor(counts, dtype=torch.float64) / 100
    scores = torch.tensor([[-1.0, -1.2, -1.5]])
    adjusted = adjust_scores(scores, log_prior(counts), 1.0)
    assert torch.allclose(adjusted, scores - prior.log().float())
    assert adjusted.argmax().item() == 2  # the rare class wins once its prior is taken out


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
