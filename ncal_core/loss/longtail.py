"""Long-tail remedies that work with classification by generation, beside the TC loss.

- post-hoc logit adjustment (Menon et al. 2021): subtract tau * log prior from the K label scores;
- a logit-adjusted training loss on the restricted label scores (the K labels' first tokens);
- class-balanced or square-root re-sampling of training rows, optionally only in the last epochs;
- `etf_target_loss`: a TC variant with fixed simplex-ETF class directions, so every class shapes the
  geometry at every step, including classes absent from the batch (Yang et al. 2022's dot regression).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ncal_core.errors import NCALError

RESAMPLING = ("none", "balanced", "sqrt")


def class_counts(class_ids: Sequence[int], num_classes: int) -> list[int]:
    """Rows per class."""
    return torch.bincount(torch.tensor(list(class_ids)), minlength=num_classes).tolist()


def log_prior(counts: Sequence[int]) -> Tensor:
    """log of the training class frequencies [K]; a class with no row gets the prior of half a row."""
    counts_t = torch.tensor(counts, dtype=torch.float64).clamp(min=0.5)
    return (counts_t / counts_t.sum()).log().float()


def adjust_scores(scores: Tensor, prior_log: Tensor, tau: float) -> Tensor:
    """Post-hoc logit adjustment: scores [N, K] - tau * log prior [K]."""
    return scores - tau * prior_log.to(scores.device)


def row_weights(class_ids: Sequence[int], num_classes: int, mode: str) -> list[float] | None:
    """Sampling weight per row: balanced = 1/n_c (every class equally often), sqrt = 1/sqrt(n_c); none -> None."""
    if mode not in RESAMPLING:
        raise NCALError(f"--resample: must be one of {', '.join(RESAMPLING)}, not {mode!r}")
    if mode == "none":
        return None
    counts = class_counts(class_ids, num_classes)
    power = 1.0 if mode == "balanced" else 0.5
    return [1.0 / counts[c] ** power for c in class_ids]


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


def simplex_etf(num_classes: int, dim: int, seed: int = 0) -> Tensor:
    """[K, H] unit vectors with pairwise cosine -1/(K-1), in a random K-dimensional subspace (seeded)."""
    if dim < num_classes:
        raise NCALError(f"a simplex ETF of {num_classes} classes needs hidden size >= {num_classes}, not {dim}")
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, num_classes, generator=gen, dtype=torch.float64))  # [H, K]
    centred = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    etf = (basis @ centred).T                                                                          # [K, H]
    return (etf / etf.norm(dim=1, keepdim=True)).float()


def etf_target_loss(z: Tensor, class_ids: Tensor, targets: Tensor) -> Tensor:
    """Dot regression to fixed ETF directions: mean_i 0.5 * (cos(z_i, w_{y_i}) - 1)^2. z [B, H], targets [K, H]."""
    unit = F.normalize(z, dim=1, eps=1e-12)
    cos = (unit * targets.to(device=z.device, dtype=z.dtype)[class_ids]).sum(dim=1)
    return 0.5 * (cos - 1.0).pow(2).mean()
