"""Metrics against scikit-learn, the text report's layout, and the paired bootstrap."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from ncal_core.evaluation.metrics import classification_report, format_report, paired_bootstrap

LABELS = ["回忆", "选取策略", "识别", "表征建模", "过程实施", "推断", "分析"]
K = len(LABELS)


def _random_case(seed: int, n: int = 350) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gold = np.repeat(np.arange(K), n // K)
    # Correct with probability 0.6, else a uniformly random class: realistic, with some confusion everywhere.
    pred = np.where(rng.random(gold.size) < 0.6, gold, rng.integers(0, K, gold.size))
    return gold, pred


EDGE_CASES = {
    "random": _random_case(0),
    "class_never_predicted": (np.arange(14) % K, np.where(np.arange(14) % K == 3, 0, np.arange(14) % K)),
    "class_absent_from_gold": (np.array([0, 1, 2, 4, 5, 6, 0, 1]), np.array([0, 3, 2, 4, 5, 6, 3, 1])),
    "class_absent_everywhere": (np.array([0, 1, 2, 3, 4, 5, 0]), np.array([0, 1, 2, 3, 4, 4, 1])),
    "perfect": (np.arange(21) % K, np.arange(21) % K),
    "all_wrong": (np.arange(21) % K, (np.arange(21) + 1) % K),
    "single_row": (np.array([2]), np.array([5])),
}


@pytest.mark.parametrize("case", EDGE_CASES)
def test_report_matches_sklearn(case: str) -> None:
    gold, pred = EDGE_CASES[case]
    report = classification_report(gold.tolist(), pred.tolist(), LABELS)
    ks = list(range(K))
    assert report["accuracy"] == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    assert report["macro_f1"] == pytest.approx(
        f1_score(gold, pred, average="macro", labels=ks, zero_division=0), abs=1e-12)
    precision, recall, f1, support = precision_recall_fscore_support(gold, pred, labels=ks, zero_division=0)
    for k, label in enumerate(LABELS):
        row = report["per_class"][label]
        expected = (precision[k], recall[k], f1[k])
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(expected, abs=1e-12)
        assert row["support"] == support[k]
    assert report["confusion"] == confusion_matrix(gold, pred, labels=ks).tolist()
    assert report["labels"] == LABELS


def test_report_is_plain_json() -> None:
    gold, pred = EDGE_CASES["random"]
    report = classification_report(gold, pred, LABELS)
    assert json.loads(json.dumps(report, ensure_ascii=False)) == report
    assert type(report["accuracy"]) is float and type(report["per_class"]["回忆"]["support"]) is int
    assert all(type(n) is int for row in report["confusion"] for n in row)


def test_never_predicted_class_counts_as_zero_in_macro_f1() -> None:
    gold, pred = EDGE_CASES["class_never_predicted"]
    report = classification_report(gold, pred, LABELS)
    assert report["per_class"]["表征建模"]["f1"] == 0.0
    f1s = [report["per_class"][label]["f1"] for label in LABELS]
    assert report["macro_f1"] == pytest.approx(sum(f1s) / K)


@pytest.mark.parametrize("gold, pred, labels, message", [
    ([0, 1], [0], ["a", "b"], "rows"),
    ([0, 2], [0, 1], ["a", "b"], "class id 2"),
    ([0, -1], [0, 1], ["a", "b"], "class id -1"),
    ([], [], ["a", "b"], "no rows"),
    ([0], [0], ["a", "a"], "repeat"),
])
def test_report_rejects_bad_input(gold: list, pred: list, labels: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        classification_report(gold, pred, labels)


def _display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def test_format_report_aligns_cjk_columns_by_display_width() -> None:
    gold, pred = EDGE_CASES["random"]
    report = classification_report(gold, pred, LABELS)
    text = format_report(report)
    assert f"{report['macro_f1']:.4f}" in text and f"{report['accuracy']:.4f}" in text
    blocks = text.split("\n\n")
    per_class = blocks[1].splitlines()
    confusion = blocks[2].splitlines()[1:]
    assert len(per_class) == K + 1 and len(confusion) == K + 1
    for table in (per_class, confusion):
        # Right-aligned numeric columns end at the same terminal column on every line.
        assert len({_display_width(line) for line in table}) == 1
    assert confusion[1].split()[1:] == [str(n) for n in report["confusion"][0]]


def test_bootstrap_delta_is_the_point_difference_and_inside_the_interval() -> None:
    gold, pred_a = _random_case(1)
    _, pred_b = _random_case(2)
    pred_b = np.where(np.arange(gold.size) % 3 == 0, gold, pred_b)  # b is better on a third of the rows
    out = paired_bootstrap(gold, pred_a, pred_b, K, n_boot=500, seed=0)
    expected = (f1_score(gold, pred_b, average="macro", labels=range(K), zero_division=0)
                - f1_score(gold, pred_a, average="macro", labels=range(K), zero_division=0))
    assert out["delta"] == pytest.approx(expected, abs=1e-12)
    assert out["low"] <= out["delta"] <= out["high"]
    assert 0 < out["low"] < out["high"] < 0.5


def test_bootstrap_resamples_rows_as_an_explicit_loop_would() -> None:
    gold, pred_a = _random_case(3, n=70)
    _, pred_b = _random_case(4, n=70)
    out = paired_bootstrap(gold, pred_a, pred_b, K, n_boot=200, seed=7)
    # Same generator, same draws, scored one resample at a time with scikit-learn.
    idx = np.random.default_rng(7).integers(0, gold.size, size=(200, gold.size))
    deltas = [f1_score(gold[i], pred_b[i], average="macro", labels=range(K), zero_division=0)
              - f1_score(gold[i], pred_a[i], average="macro", labels=range(K), zero_division=0) for i in idx]
    assert (out["low"], out["high"]) == pytest.approx(tuple(np.percentile(deltas, [2.5, 97.5])), abs=1e-12)


def test_bootstrap_of_identical_predictions_is_zero() -> None:
    gold, pred = _random_case(5)
    assert paired_bootstrap(gold, pred, pred, K, n_boot=100) == {"delta": 0.0, "low": 0.0, "high": 0.0}


def test_bootstrap_is_reproducible_for_a_seed() -> None:
    gold, pred_a = _random_case(6)
    _, pred_b = _random_case(8)
    first = paired_bootstrap(gold, pred_a, pred_b, K, n_boot=100, seed=3)
    assert paired_bootstrap(gold, pred_a, pred_b, K, n_boot=100, seed=3) == first


def test_no_class_predictions_count_as_wrong_like_sklearn_with_an_unlisted_label():
    gold = [0, 1, 2, 2, 1, 0, 2]
    pred = [0, -1, 2, -1, 1, 1, 2]
    labels = ["a", "b", "c"]
    report = classification_report(gold, pred, labels)
    names = [labels[p] if p >= 0 else "<none>" for p in pred]
    gold_names = [labels[g] for g in gold]
    assert report["accuracy"] == pytest.approx(accuracy_score(gold_names, names))
    assert report["macro_f1"] == pytest.approx(
        f1_score(gold_names, names, labels=labels, average="macro", zero_division=0))
    assert [report["per_class"][x]["support"] for x in labels] == [2, 2, 3]
