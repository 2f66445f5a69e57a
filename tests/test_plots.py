"""Each figure is written as a PNG of a sensible size; names without a font fall back to aliases, not tofu."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from ncal_core.errors import NCALError
from ncal_core.evaluation import plots
from ncal_core.evaluation.metrics import classification_report

LABELS = ["回忆", "选取策略", "识别", "表征建模", "过程实施", "推断", "分析"]


def _png_size(path: Path) -> tuple[int, int]:
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def _pixels(path: Path) -> np.ndarray:
    """[H, W, 3] RGB of a PNG."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _features(per_class: int = 10, k: int = 7, h: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(k), per_class)
    feats = 3.0 * rng.standard_normal((k, h))[ids] + rng.standard_normal((ids.size, h))
    return torch.tensor(feats, dtype=torch.float32), torch.tensor(ids)


@pytest.fixture
def no_cjk_font(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine where no font has the class names' characters."""
    monkeypatch.setattr(plots, "_font_for", lambda chars: None)


def test_sphere_plot_draws_the_features(tmp_path: Path) -> None:
    feats, ids = _features()
    plots.sphere_plot(feats, ids, LABELS, tmp_path / "sub" / "sphere.png")
    plots.sphere_plot(feats, ids.roll(5), LABELS, tmp_path / "shuffled.png")  # the same points, other classes
    drawn, shuffled = _pixels(tmp_path / "sub" / "sphere.png"), _pixels(tmp_path / "shuffled.png")
    assert drawn.shape == shuffled.shape and (drawn != shuffled).any(axis=2).mean() > 0.001
    assert len(np.unique(drawn.reshape(-1, 3), axis=0)) > 7  # more than a colour per class: points, not a blank


def test_sphere_plot_with_two_classes_completes_the_3d_view(tmp_path: Path) -> None:
    feats, ids = _features(k=2)
    plots.sphere_plot(feats, ids, LABELS[:2], tmp_path / "sphere.png")
    assert _png_size(tmp_path / "sphere.png")[0] >= 800


def test_sphere_plot_rejects_features_of_fewer_than_three_dims(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="H >= 3"):
        plots.sphere_plot(torch.ones(4, 2), torch.tensor([0, 0, 1, 1]), LABELS[:2], tmp_path / "x.png")


def test_sphere_basis_is_orthonormal_and_spans_the_class_means() -> None:
    rng = np.random.default_rng(1)
    means = torch.tensor(rng.standard_normal((4, 10)))
    centred = means - means.mean(dim=0)
    basis = plots._sphere_basis(centred, torch.tensor(rng.standard_normal((40, 10))))
    assert torch.allclose(basis @ basis.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    # Four centred means span three directions, so the basis keeps all of them.
    assert torch.allclose(centred @ basis.T @ basis, centred, atol=1e-12)


def test_f1_bars_grow_with_the_f1_values(tmp_path: Path) -> None:
    gold = np.repeat(np.arange(7), 10)
    pred = np.where(np.arange(70) % 3 == 0, (gold + 1) % 7, gold)
    plots.f1_bars(classification_report(gold, pred, LABELS), tmp_path / "f1.png")
    plots.f1_bars(classification_report(gold, gold, LABELS), tmp_path / "perfect.png")
    bars, perfect = _pixels(tmp_path / "f1.png"), _pixels(tmp_path / "perfect.png")
    # the bars' heights follow the F1 values: every bar reaches 1.0 in the perfect report, so more is painted
    painted = lambda image: (image.astype(int).sum(axis=2) < 600).mean()  # noqa: E731
    assert bars.shape == perfect.shape and painted(perfect) > painted(bars)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_training_curves_plot_the_keys_present(tmp_path: Path) -> None:
    records = [{"step": s, "loss": 2.0 / s, "lm_loss": 1.9 / s, "tc_loss": 0.1 / s, "lr": 2e-4} for s in range(1, 41)]
    records += [{"step": s, "eval_macro_f1": 0.5 + s / 100, "eval_accuracy": 0.55 + s / 100} for s in (20, 40)]
    plots.training_curves(_write_jsonl(tmp_path / "metrics.jsonl", records), tmp_path / "curves.png")
    width, height = _png_size(tmp_path / "curves.png")
    assert width >= 1200 and height >= 700  # four panels in a 2 x 2 grid


def test_training_curves_with_loss_only_is_one_panel(tmp_path: Path) -> None:
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    plots.training_curves(_write_jsonl(tmp_path / "metrics.jsonl", records), tmp_path / "curves.png")
    width, height = _png_size(tmp_path / "curves.png")
    assert 600 <= width < 1200 and height >= 300


@pytest.mark.parametrize("text, message", [
    ('{"step": 1, "loss": 1.0}\nnot json\n', r"metrics.jsonl:2: not JSON"),
    ('{"loss": 1.0}\n', r"metrics.jsonl:1: step"),
    ('{"step": 1, "tokens": 5}\n', "no step has any of"),
])
def test_training_curves_reject_bad_metrics_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(NCALError, match=message):
        plots.training_curves(path, tmp_path / "curves.png")


def test_comparison_plot_writes_a_png(tmp_path: Path) -> None:
    rows = [{"method": name, "macro_f1_mean": m, "macro_f1_std": 0.02, "accuracy_mean": m + 0.02, "accuracy_std": 0.01}
            for name, m in (("SFT", 0.58), ("SFT + TC", 0.61))]
    plots.comparison_plot(rows, tmp_path / "compare.png")
    width, height = _png_size(tmp_path / "compare.png")
    assert width >= 700 and height >= 500


def test_comparison_plot_names_a_missing_key() -> None:
    with pytest.raises(ValueError, match="row 0 lacks accuracy_std"):
        plots.comparison_plot([{"method": "SFT", "macro_f1_mean": 0.5, "macro_f1_std": 0.0, "accuracy_mean": 0.5}],
                              "unused.png")


def test_names_without_a_font_become_aliases_and_the_mapping_is_printed(
        no_cjk_font: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plots._say_once.cache_clear()
    for _ in range(2):  # a report draws several pictures: the mapping is printed for the first only
        with plots._text_setting(LABELS, "C", "class") as (names, caption):
            assert names == [f"C{i}" for i in range(7)]
            assert "C" in caption and "no installed font" in caption
    assert capsys.readouterr().out.count("C1 = 选取策略") == 1
    plots.f1_bars(classification_report([0, 1], [0, 1], LABELS), tmp_path / "f1.png")
    assert _png_size(tmp_path / "f1.png")[0] >= 700


def test_names_the_default_font_draws_are_kept_unchanged(no_cjk_font: None) -> None:
    with plots._text_setting(["R-FR", "SFT + TC (λ=0.1)"], "M", "method") as (names, caption):
        assert names == ["R-FR", "SFT + TC (λ=0.1)"] and caption == "method"


def test_cjk_names_are_drawn_with_an_installed_cjk_font() -> None:
    font = plots._font_for(frozenset("".join(LABELS)))
    if font is None:
        pytest.skip(f"no CJK font installed (Debian: {plots.CJK_FONT_PACKAGE})")
    with plots._text_setting(LABELS, "C", "class") as (names, _):
        assert names == LABELS and matplotlib.rcParams["font.family"][-1] == font


def test_font_search_ignores_the_last_resort_placeholder_font() -> None:
    assert plots._font_for(frozenset("\U0010fffd")) is None
    assert plots._font_for(frozenset("abc")) is not None

