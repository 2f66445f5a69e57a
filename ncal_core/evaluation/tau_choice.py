"""The post-hoc logit-adjustment tau, chosen on a development split.

A stratified development split carries the training prior, while a long-tailed task's test split is often
balanced (TMWPL's is). Counted as it is, such a split rewards tau = 0: on TMWPL's, tau 1.5 lowers its
macro-F1 from 0.703 to 0.619 while raising the balanced test's from 0.609 to 0.676. With `balanced` weighting
each development row counts 1 / (its class's rows in the split), so the confusion is the one expected on a
balanced split of the same rows; `none` counts rows as they are (for a test split that has the training prior).
The best checkpoint is chosen by the same weighted macro-F1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from ncal_core.evaluation.metrics import weighted_macro_f1
from ncal_core.loss.logit_adjustment import adjust_scores

TAU_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
DEV_WEIGHTINGS = ("balanced", "none")


def dev_row_weights(gold: Sequence[int], num_classes: int, weighting: str) -> np.ndarray:
    """[N] weights of the development rows: 1 / (rows of the row's class) for `balanced`, ones for `none`."""
    gold_arr = np.asarray(gold, dtype=np.int64)
    if weighting == "none":
        return np.ones(len(gold_arr))
    if weighting != "balanced":
        raise ValueError(f"dev weighting must be one of {DEV_WEIGHTINGS}, not {weighting!r}")
    return 1.0 / np.bincount(gold_arr, minlength=num_classes)[gold_arr]


def choose_tau(scores: Tensor, gold: Sequence[int], prior_log: Tensor, weights: np.ndarray,
               taus: Sequence[float] = TAU_GRID) -> tuple[float, list[float]]:
    """(tau, the weighted macro-F1 of the adjusted argmax at each of taus): the best, the smallest among ties."""
    num_classes = scores.shape[1]
    by_tau = [weighted_macro_f1(gold, adjust_scores(scores, prior_log, tau).argmax(1).tolist(), num_classes,
                                weights) for tau in taus]
    return float(taus[int(np.argmax(by_tau))]), by_tau  # argmax takes the first maximum: taus ascend
