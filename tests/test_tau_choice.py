"""Choosing the post-hoc tau on a development split, against scikit-learn's weighted F1 and a balanced copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from ncal_core.evaluation.metrics import classification_report, weighted_macro_f1
from ncal_core.evaluation.tau_choice import TAU_GRID, choose_tau, dev_row_weights
from ncal_core.loss.logit_adjustment import adjust_scores, log_prior

K = 4


def imbalanced_dev(seed: int = 0) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Scores [N, K] biased towards the head classes, as a model trained on the long-tailed prior scores them."""
    rng = np.random.default_rng(seed)
    counts = [60, 25, 10, 5]
    gold = np.repeat(np.arange(K), counts)
    prior = log_prior(counts)
    scores = torch.tensor(rng.normal(size=(len(gold), K)), dtype=torch.float32)
    scores[torch.arange(len(gold)), torch.tensor(gold)] += 1.5
    return scores + 1.2 * prior, gold.tolist(), prior


@pytest.mark.parametrize("seed", range(5))
def test_weighted_macro_f1_equals_scikit_learns_with_sample_weights(seed):
    rng = np.random.default_rng(seed)
    gold, pred = rng.integers(0, K, 200), rng.integers(0, K, 200)
    weights = rng.uniform(0.1, 3.0, 200)
    expected = f1_score(gold, pred, labels=list(range(K)), average="macro", sample_weight=weights, zero_division=0)
    assert weighted_macro_f1(gold, pred, K, weights) == pytest.approx(expected, abs=1e-12)


def test_balanced_weights_score_the_split_as_a_balanced_copy_of_it_would_be_scored():
    scores, gold, _ = imbalanced_dev()
    pred = scores.argmax(1).numpy()
    weights = dev_row_weights(gold, K, "balanced")
    # every row of class c repeated lcm / n_c times: each class then has the same number of rows
    counts = np.bincount(gold, minlength=K)
    repeats = np.lcm.reduce(counts) // counts[gold]
    copy = classification_report(np.repeat(gold, repeats), np.repeat(pred, repeats), list("abcd"))
    assert weighted_macro_f1(gold, pred, K, weights) == pytest.approx(copy["macro_f1"], abs=1e-12)
    assert weighted_macro_f1(gold, pred, K, dev_row_weights(gold, K, "none")) == pytest.approx(
        classification_report(gold, pred, list("abcd"))["macro_f1"], abs=1e-12)


def test_the_choice_is_the_grids_best_and_the_smallest_of_ties():
    scores, gold, prior = imbalanced_dev()
    weights = dev_row_weights(gold, K, "balanced")
    tau, by_tau = choose_tau(scores, gold, prior, weights)
    expected = [weighted_macro_f1(gold, adjust_scores(scores, prior, t).argmax(1).numpy(), K, weights)
                for t in TAU_GRID]
    assert by_tau == pytest.approx(expected)
    assert tau == TAU_GRID[int(np.argmax(expected))] and tau > 0  # these scores lean on the prior: tau undoes it
    # scores that ignore the prior: every tau up to some point predicts the same, and the tie goes to 0
    plain = torch.nn.functional.one_hot(torch.tensor(gold), K).float() * 10
    assert choose_tau(plain, gold, prior, weights)[0] == 0.0


def test_balanced_weighting_chooses_a_larger_tau_than_counting_rows_as_drawn():
    # on a split with the training prior, counting rows as drawn favours the head classes and so small taus
    scores, gold, prior = imbalanced_dev()
    balanced = choose_tau(scores, gold, prior, dev_row_weights(gold, K, "balanced"))[0]
    as_drawn = choose_tau(scores, gold, prior, dev_row_weights(gold, K, "none"))[0]
    assert balanced > as_drawn


def test_an_unknown_weighting_is_a_contract_violation():
    with pytest.raises(ValueError, match="dev weighting"):
        dev_row_weights([0, 1], 2, "prior")
