"""Logit adjustment: the prior, the post-hoc adjustment and the restricted logit-adjusted training loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ncal_core.loss.logit_adjustment import (
    adjust_scores,
    decision_scores,
    label_decisions,
    log_prior,
    logit_adjusted_loss,
)


def test_post_hoc_adjustment_subtracts_tau_log_prior():
    counts = [80, 15, 5]
    prior = torch.tensor(counts, dtype=torch.float64) / 100
    scores = torch.tensor([[-1.0, -1.2, -1.5]])
    adjusted = adjust_scores(scores, log_prior(counts), 1.0)
    assert torch.allclose(adjusted, scores - prior.log().float())
    assert adjusted.argmax().item() == 2  # the rare class wins once its prior is taken out


def test_with_distinct_first_tokens_the_loss_is_cross_entropy_over_the_k_first_token_scores():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 11, generator=gen)  # each row's logits at its first label token
    y = torch.tensor([0, 2, 1, 0])
    counts = [50, 30, 20]
    decisions = label_decisions([[3, 1], [7, 5, 1], [1, 1]], counts)
    assert decisions.tokens.shape == (3, 1, 3) and decisions.target[:, 0].tolist() == [0, 1, 2]
    assert torch.allclose(decisions.log_prior[:, 0], log_prior(counts).expand(3, 3), atol=1e-6)
    expected = F.cross_entropy(logits[:, [3, 7, 1]] + 0.7 * log_prior(counts), y)
    scores = decision_scores(logits, torch.arange(4), y, decisions)
    assert torch.allclose(logit_adjusted_loss(scores, y, decisions, 0.7), expected, atol=1e-6)


# I-H, I-Q and R as three labels of which two share their first token: [I, -H, eos], [I, -Q, eos], [R, eos]
SHARED = [[4, 9, 1], [4, 2, 1], [5, 1]]
SHARED_COUNTS = [50, 30, 20]


def test_labels_sharing_a_prefix_decide_at_the_first_token_and_where_they_part():
    d = label_decisions(SHARED, SHARED_COUNTS)
    # I-H: I or R (priors 0.8 / 0.2), then -H or -Q (50 / 80 and 30 / 80); R: only the first decision
    assert d.position.tolist() == [[0, 1], [0, 1], [0, 0]]
    assert d.tokens[0].tolist() == [[4, 5], [9, 2]] and d.tokens[1].tolist() == [[4, 5], [9, 2]]
    assert d.target.tolist() == [[0, 0], [0, 1], [1, 0]]
    assert d.valid[2].tolist() == [[True, True], [True, False]]  # R's second decision is padding
    expected = torch.tensor([[0.8, 0.2], [50 / 80, 30 / 80]]).log()
    assert torch.allclose(d.log_prior[0], expected, atol=1e-6) and torch.allclose(d.log_prior[1], expected, atol=1e-6)
    # along each label's path the priors multiply to its own
    path = d.log_prior.gather(2, d.target[..., None])[..., 0] * d.valid[..., 1]
    assert torch.allclose(path.sum(1), log_prior(SHARED_COUNTS), atol=1e-6)


def test_the_loss_over_shared_prefixes_equals_the_per_decision_cross_entropies_by_hand():
    gen = torch.Generator().manual_seed(1)
    d = label_decisions(SHARED, SHARED_COUNTS)
    y = torch.tensor([0, 1, 2, 1])
    n_targets = torch.tensor([len(SHARED[c]) for c in y])
    starts = torch.cumsum(n_targets, 0) - n_targets
    logits = torch.randn(int(n_targets.sum()), 11, generator=gen, requires_grad=True)  # [N targets, V]
    tau = 1.3
    loss = logit_adjusted_loss(decision_scores(logits, starts, y, d), y, d, tau)

    def ce(row: int, at: int, tokens: list[int], priors: list[float], own: int) -> torch.Tensor:
        adjusted = logits[starts[row] + at, tokens] + tau * torch.tensor(priors).log()
        return -torch.log_softmax(adjusted, 0)[own]

    first, second = [0.8, 0.2], [50 / 80, 30 / 80]
    expected = (ce(0, 0, [4, 5], first, 0) + ce(0, 1, [9, 2], second, 0)      # I-H
                + ce(1, 0, [4, 5], first, 0) + ce(1, 1, [9, 2], second, 1)    # I-Q
                + ce(2, 0, [4, 5], first, 1)                                  # R
                + ce(3, 0, [4, 5], first, 0) + ce(3, 1, [9, 2], second, 1)) / 4
    assert torch.allclose(loss, expected, atol=1e-6)
    grad, = torch.autograd.grad(loss, logits)
    grad_expected, = torch.autograd.grad(expected, logits)
    assert torch.allclose(grad, grad_expected, atol=1e-6)


def test_the_first_token_alone_cannot_tell_labels_sharing_it_apart():
    # what the loss over the first token alone did: I-H and I-Q got the same score, so one of them always lost;
    # the decisions give the second token's scores a say
    d = label_decisions(SHARED, SHARED_COUNTS)
    logits = torch.zeros(3, 11)
    logits[0, 4], logits[1, 2] = 5.0, 5.0  # I, then -Q: the model says I-Q
    y = torch.tensor([1])
    right = logit_adjusted_loss(decision_scores(logits, torch.tensor([0]), y, d), y, d, 0.0)
    wrong = logit_adjusted_loss(decision_scores(logits, torch.tensor([0]), torch.tensor([0]), d), torch.tensor([0]),
                                d, 0.0)
    assert right < 0.02 < 4.0 < wrong


def test_labels_with_the_same_tokens_are_refused():
    with pytest.raises(ValueError, match="same token ids"):
        label_decisions([[4, 1], [4, 1]], [1, 1])
