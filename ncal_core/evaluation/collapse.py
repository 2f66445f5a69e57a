"""Neural-collapse figures of pooled features: NC1 (within/between scatter) and NC2 (simplex-ETF geometry)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class ClassGeometry(NamedTuple):
    """Unit features and their class means, in float64, over the classes that have features."""

    features: Tensor  # [N, H] rows of unit length
    rows: Tensor  # [N] each feature's class as an index into `present`
    present: Tensor  # [K'] class ids with at least one feature, ascending
    means: Tensor  # [K', H] class means of the unit features
    centre: Tensor  # [H] mu_G, the mean of the class means


def class_geometry(features: Tensor, class_ids: Tensor, num_classes: int) -> ClassGeometry:
    """L2-normalise features `[N, H]` and average them per class id `[N]`; needs two classes present.

    The centre mu_G is the mean of the class means rather than of the features, so a
    long-tailed set does not pull it towards its head classes; on a balanced set (as the
    test sets are) the two coincide.
    """
    if features.dim() != 2 or class_ids.shape != features.shape[:1]:
        raise ValueError(f"need features [N, H] and class ids [N], got {tuple(features.shape)} "
                        f"and {tuple(class_ids.shape)}")
    if num_classes < 2:
        raise ValueError(f"neural collapse needs at least 2 classes, got num_classes={num_classes}")
    ids = class_ids.detach().to("cpu", torch.int64)
    if ids.numel() and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(f"class ids must lie in 0..{num_classes - 1}")
    present, rows = torch.unique(ids, return_inverse=True)
    if present.numel() < 2:
        raise ValueError(f"neural collapse needs features of at least 2 classes, got {present.numel()}")
    x = features.detach().to("cpu", torch.float64)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    counts = torch.bincount(rows, minlength=present.numel()).to(torch.float64)
    means = torch.zeros(present.numel(), x.shape[1], dtype=torch.float64).index_add_(0, rows, x) / counts[:, None]
    return ClassGeometry(x, rows, present, means, means.mean(dim=0))


def neural_collapse(features: Tensor, class_ids: Tensor, num_classes: int) -> dict:
    """NC1, NC2 cosines and equinorm of L2-normalised features `[N, H]` with class ids `[N]`, in float64.

    Classes with no feature are skipped: K' = num_classes_present replaces K in every
    average (NC1 = tr(S_W S_B^+) / K'), while etf_cos stays the task's target -1/(K - 1).
    S_W weights each present class's covariance (normalised by its own count) equally and
    S_B is the mean outer product of the centred class means, so on a balanced set both
    are the usual sample scatters; nc1 is inf when all class means coincide. mu_G: see
    class_geometry. Standard deviations are population ones (ddof 0).
    """
    geo = class_geometry(features, class_ids, num_classes)
    k_present = geo.present.numel()
    centred = geo.means - geo.centre
    deviations = geo.features - geo.means[geo.rows]
    weights = 1.0 / torch.bincount(geo.rows).to(torch.float64)[geo.rows]

    # With the thin SVD centred = U diag(s) V^T, S_B = V diag(s^2 / K') V^T, so tr(S_W S_B^+) =
    # sum_k sum_i w_i (d_i . v_k)^2 / s_k^2 and no [H, H] matrix is ever formed. The cut-off is
    # torch.linalg.pinv's default on S_B's eigenvalues; it drops the direction centring removed.
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    keep = s**2 > s[0] ** 2 * centred.shape[1] * torch.finfo(torch.float64).eps
    spread = (weights[:, None] * (deviations @ vh[keep].T) ** 2).sum(dim=0)
    # Class means that all coincide leave no between-class scatter to divide by.
    nc1 = (spread / s[keep] ** 2).sum() / k_present if keep.any() else torch.tensor(float("inf"))

    norms = centred.norm(dim=1)
    unit = centred / norms.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    upper = torch.triu_indices(k_present, k_present, offset=1)
    cosines = (unit @ unit.T)[upper[0], upper[1]]
    return {
        "nc1": float(nc1),
        "nc2_cos_mean": float(cosines.mean()),
        "nc2_cos_std": float(cosines.std(correction=0)),
        "etf_cos": -1.0 / (num_classes - 1),
        "equinorm_cv": float(norms.std(correction=0) / norms.mean()),
        "num_classes_present": k_present,
    }
