"""Neural-collapse figures on constructed geometries and against an explicit numpy reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ncal_core.evaluation.collapse import class_geometry, neural_collapse

K, H, PER_CLASS = 7, 32, 20


def _simplex_etf(k: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """K unit vectors `[K, H]` with pairwise cosine -1/(K-1), in a random K-dim subspace of R^H."""
    etf = np.sqrt(k / (k - 1)) * (np.eye(k) - np.ones((k, k)) / k)
    basis, _ = np.linalg.qr(rng.standard_normal((h, k)))
    return etf @ basis.T


def _etf_features(noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    means = _simplex_etf(K, H, rng)
    ids = np.repeat(np.arange(K), PER_CLASS)
    feats = 3.0 * means[ids] + noise * rng.standard_normal((ids.size, H))
    return torch.tensor(feats, dtype=torch.float32), torch.tensor(ids)


def _reference_nc1(feats: np.ndarray, ids: np.ndarray) -> float:
    """tr(S_W S_B^+) / K' written out with loops: class-weighted S_W, S_B about the mean of class means."""
    x = feats.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    classes = sorted(set(ids.tolist()))
    means = {c: x[ids == c].mean(axis=0) for c in classes}
    centre = sum(means.values()) / len(classes)
    s_w = np.zeros((x.shape[1], x.shape[1]))
    s_b = np.zeros_like(s_w)
    for c in classes:
        members = x[ids == c]
        for row in members:
            s_w += np.outer(row - means[c], row - means[c]) / len(members) / len(classes)
        s_b += np.outer(means[c] - centre, means[c] - centre) / len(classes)
    return float(np.trace(s_w @ np.linalg.pinv(s_b, rcond=1e-10, hermitian=True)) / len(classes))


def _reference_cosines(feats: np.ndarray, ids: np.ndarray) -> list[float]:
    x = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    classes = sorted(set(ids.tolist()))
    means = [x[ids == c].mean(axis=0) for c in classes]
    centre = np.mean(means, axis=0)
    return [float(np.dot(a - centre, b - centre) / np.linalg.norm(a - centre) / np.linalg.norm(b - centre))
            for a, b in itertools.combinations(means, 2)]


def test_exact_simplex_etf_gives_etf_cosines_equal_norms_and_zero_nc1() -> None:
    feats, ids = _etf_features(noise=0.0)
    out = neural_collapse(feats, ids, K)
    assert out["etf_cos"] == pytest.approx(-1 / 6)
    assert out["nc2_cos_mean"] == pytest.approx(-1 / 6, abs=1e-6)
    assert out["nc2_cos_std"] == pytest.approx(0.0, abs=1e-6)
    assert out["equinorm_cv"] == pytest.approx(0.0, abs=1e-6)
    assert out["nc1"] == pytest.approx(0.0, abs=1e-10)
    assert out["num_classes_present"] == K


def test_etf_shifted_off_the_origin_is_still_an_etf_after_centring() -> None:
    rng = np.random.default_rng(1)
    means = _simplex_etf(K, H, rng)
    shift = rng.standard_normal(H)
    shift -= means.T @ np.linalg.lstsq(means.T, shift, rcond=None)[0]  # orthogonal to the ETF: equal norms remain
    ids = np.repeat(np.arange(K), 5)
    out = neural_collapse(torch.tensor(means[ids] + shift), torch.tensor(ids), K)
    assert out["nc2_cos_mean"] == pytest.approx(-1 / 6, abs=1e-9)
    assert out["nc2_cos_std"] == pytest.approx(0.0, abs=1e-9)
    assert out["equinorm_cv"] == pytest.approx(0.0, abs=1e-9)


def test_small_noise_keeps_cosines_near_the_etf_value() -> None:
    out = neural_collapse(*_etf_features(noise=0.05), K)
    assert out["nc2_cos_mean"] == pytest.approx(-1 / 6, abs=1e-3)
    assert out["nc2_cos_std"] < 0.02
    assert out["equinorm_cv"] < 0.02


def test_collapsed_features_give_zero_nc1() -> None:
    rng = np.random.default_rng(2)
    means = rng.standard_normal((K, H))
    ids = np.repeat(np.arange(K), 4)
    out = neural_collapse(torch.tensor(means[ids] * 5.0), torch.tensor(ids), K)
    assert out["nc1"] == pytest.approx(0.0, abs=1e-12)


def test_nc1_grows_with_within_class_noise() -> None:
    values = [neural_collapse(*_etf_features(noise), K)["nc1"] for noise in (0.05, 0.3, 1.0, 3.0)]
    assert all(a < b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("h", [32, 4])  # H >= K and H < K - 1 (S_B of full rank H)
def test_nc1_and_cosines_match_explicit_numpy_on_imbalanced_data_with_an_absent_class(h: int) -> None:
    rng = np.random.default_rng(3)
    ids = np.concatenate([np.full(n, c) for c, n in zip([0, 1, 2, 4, 5, 6], [30, 12, 7, 3, 2, 1])])
    feats = rng.standard_normal((ids.size, h)) + 2.0 * rng.standard_normal((K, h))[ids]
    out = neural_collapse(torch.tensor(feats, dtype=torch.float32), torch.tensor(ids), K)
    feats32 = torch.tensor(feats, dtype=torch.float32).double().numpy()
    assert out["nc1"] == pytest.approx(_reference_nc1(feats32, ids), rel=1e-9)
    cosines = _reference_cosines(feats32, ids)
    assert out["nc2_cos_mean"] == pytest.approx(np.mean(cosines), abs=1e-12)
    assert out["nc2_cos_std"] == pytest.approx(np.std(cosines), abs=1e-12)
    assert out["num_classes_present"] == 6
    assert out["etf_cos"] == pytest.approx(-1 / 6)


def test_class_geometry_centre_is_mean_of_class_means() -> None:
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    geo = class_geometry(feats, torch.tensor([0, 0, 0, 2]), 3)
    assert geo.present.tolist() == [0, 2] and geo.rows.tolist() == [0, 0, 0, 1]
    assert geo.centre.tolist() == pytest.approx([0.5, 0.5])


def test_coinciding_class_means_give_infinite_nc1() -> None:
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert neural_collapse(feats, torch.tensor([0, 0, 1, 1]), 2)["nc1"] == float("inf")


@pytest.mark.parametrize("feats, ids, k, message", [
    (torch.ones(3, 4), torch.tensor([0, 1]), 2, "class ids"),
    (torch.ones(2, 4), torch.tensor([0, 3]), 2, "0..1"),
    (torch.ones(2, 4), torch.tensor([1, 1]), 2, "at least 2 classes"),
    (torch.ones(2, 4), torch.tensor([0, 0]), 1, "at least 2 classes"),
])
def test_neural_collapse_rejects_bad_input(feats: torch.Tensor, ids: torch.Tensor, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        neural_collapse(feats, ids, k)
