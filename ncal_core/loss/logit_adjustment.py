"""Logit adjustment by the training prior (Menon et al. 2021), the long-tail remedy beside the TC loss.

- post-hoc: subtract tau * log prior from the K label scores before the argmax;
- as a training loss: cross-entropy over the restricted label scores (the K labels' first tokens) + tau * log prior.
Re-sampling of training rows, the other remedy, is the sampler's (data.batching.row_weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ncal_core.errors import NCALError


def log_prior(counts: Sequence[int]) -> Tensor:
    """log of the training class frequencies [K]; a class with no row gets the prior of half a row."""
    counts_t = torch.tensor(counts, dtype=torch.float64).clamp(min=0.5)
    return (counts_t / counts_t.sum()).log().float()


def adjust_scores(scores: Tensor, prior_log: Tensor, tau: float) -> Tensor:
    """Post-hoc logit adjustment: scores [N, K] - tau * log prior [K]."""
    return scores - tau * prior_log.to(scores.device)


def first_label_tokens(label_ids: Sequence[list[int]], labels: Sequence[str]) -> list[int]:
    """The first token of each label; the restricted scores need them to differ between labels."""
    firsts = [ids[0] for ids in label_ids]
    if len(set(firsts)) != len(firsts):
        shared = [label for label, first in zip(labels, firsts) if firsts.count(first) > 1]
        raise NCALError(f"--la_loss_tau: labels {shared} start with the same token, so their restricted scores "
                        "cannot be told apart")
    return firsts


def logit_adjusted_loss(first_scores: Tensor, class_ids: Tensor, prior_log: Tensor, tau: float) -> Tensor:
    """Mean over rows of CE over the K restricted label scores + tau * log prior.

    first_scores [B, K]: at each row's last prompt token, the logits of the labels' first tokens.
    """
    restricted = first_scores.float() + tau * prior_log.to(first_scores.device)
    return F.cross_entropy(restricted, class_ids)
