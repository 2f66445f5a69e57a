"""Classification metrics (accuracy, macro-F1, per-class scores, confusion) and a paired bootstrap."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import numpy as np

# Rows per bootstrap chunk: bounds the [chunk, N] index array to a few tens of MB.
_BOOT_CELLS = 4_000_000


def _check(gold: Sequence[int], preds: Sequence[Sequence[int]], num_classes: int,
           allow_no_class: bool = False) -> list[np.ndarray]:
    """Gold and predictions as int64 arrays `[N]`, after checking lengths and class ids (-1 allowed if asked)."""
    if num_classes < 1:
        raise ValueError(f"need at least one class, got num_classes={num_classes}")
    arrays = [np.asarray(gold, dtype=np.int64).reshape(-1)]
    arrays += [np.asarray(p, dtype=np.int64).reshape(-1) for p in preds]
    if arrays[0].size == 0:
        raise ValueError("no rows to score")
    for name, arr in zip(["gold"] + ["predictions"] * len(preds), arrays):
        if arr.shape != arrays[0].shape:
            raise ValueError(f"{name} has {arr.size} rows but gold has {arrays[0].size}")
        lowest = -1 if allow_no_class and name == "predictions" else 0
        bad = arr[(arr < lowest) | (arr >= num_classes)]
        if bad.size:
            raise ValueError(f"{name} holds class id {int(bad[0])}, outside 0..{num_classes - 1}")
    return arrays


def _confusion(gold: np.ndarray, pred: np.ndarray, num_classes: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Counts `[K, K]` (each row counting its weight, when given), rows = gold, columns = predicted."""
    return np.bincount(gold * num_classes + pred, weights=weights,
                       minlength=num_classes**2).reshape(num_classes, num_classes)


def _per_class(confusion: np.ndarray, actual: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 `[..., K]` from confusion counts `[..., K, K]`; 0 wherever a ratio is 0/0.

    `actual` (gold rows per class) defaults to the confusion's row sums; it is larger when some
    rows were predicted as no class at all.
    """
    tp = np.diagonal(confusion, axis1=-2, axis2=-1).astype(np.float64)
    predicted = confusion.sum(axis=-2)
    actual = confusion.sum(axis=-1) if actual is None else actual

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)

    # F1 = 2tp / (2tp + fp + fn): the harmonic mean of P and R, and 0 when both are 0.
    return ratio(tp, predicted), ratio(tp, actual), ratio(2 * tp, predicted + actual)


def _macro_f1(confusion: np.ndarray) -> np.ndarray:
    """Unweighted mean of per-class F1 `[...]` from confusion counts `[..., K, K]`."""
    return _per_class(confusion)[2].mean(axis=-1)


def weighted_macro_f1(gold: Sequence[int], pred: Sequence[int], num_classes: int, weights: np.ndarray) -> float:
    """Macro-F1 of class ids `[N]` with row i counting weights[i] times in the confusion."""
    gold_arr, pred_arr = _check(gold, [pred], num_classes)
    return float(_macro_f1(_confusion(gold_arr, pred_arr, num_classes, np.asarray(weights, dtype=np.float64))))


def classification_report(gold: Sequence[int], pred: Sequence[int], labels: list[str]) -> dict:
    """Accuracy, macro-F1 over all K labels, per-class P/R/F1/support and confusion for class ids `[N]`.

    A prediction of -1 means "no class" (a generated text that is no label): it is wrong for its
    gold class and counts against no class's precision; the confusion matrix leaves it out.
    """
    if len(set(labels)) != len(labels):
        raise ValueError(f"class labels repeat: {labels}")
    gold_arr, pred_arr = _check(gold, [pred], len(labels), allow_no_class=True)
    valid = pred_arr >= 0
    confusion = _confusion(gold_arr[valid], pred_arr[valid], len(labels))
    support = np.bincount(gold_arr, minlength=len(labels))
    precision, recall, f1 = _per_class(confusion, support)
    return {
        "accuracy": float(np.trace(confusion) / gold_arr.size),
        "macro_f1": float(f1.mean()),
        "labels": list(labels),
        "per_class": {
            label: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                    "support": int(support[k])}
            for k, label in enumerate(labels)
        },
        "confusion": confusion.tolist(),
    }


def display_width(text: str) -> int:
    """Terminal columns `text` takes: East Asian wide and full-width characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _table(rows: list[list[str]]) -> str:
    """Rows of cells as aligned text: first column left-aligned, the rest right-aligned."""
    widths = [max(display_width(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0] + " " * (widths[0] - display_width(row[0]))]
        cells += [" " * (w - display_width(cell)) + cell for cell, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """A classification_report dict as text: headline, per-class table, confusion matrix."""
    labels = report["labels"]
    per_class = [["class", "precision", "recall", "f1", "support"]]
    per_class += [[label] + [f"{report['per_class'][label][key]:.4f}" for key in ("precision", "recall", "f1")]
                  + [str(report["per_class"][label]["support"])] for label in labels]
    confusion = [["gold \\ predicted"] + labels]
    confusion += [[label] + [str(n) for n in row] for label, row in zip(labels, report["confusion"])]
    rows = sum(report["per_class"][label]["support"] for label in labels)
    return "\n\n".join([
        f"accuracy {report['accuracy']:.4f}   macro-F1 {report['macro_f1']:.4f}   ({rows} rows, {len(labels)} classes)",
        _table(per_class),
        "confusion matrix (rows = gold, columns = predicted)\n" + _table(confusion),
    ])


def paired_bootstrap(gold: Sequence[int], pred_a: Sequence, pred_b: Sequence, num_classes: int,
                     n_boot: int = 2000, seed: int = 0) -> dict:
    """Macro-F1(b) - macro-F1(a) on the rows `[N]`, with a 95% percentile interval over joint row resamples.

    pred_a, pred_b: [N] predictions, or [S, N] of S seeds each: then the difference is the mean over seeds of
    seed s's b minus seed s's a, every resample shared by all of them.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    seeds_a, seeds_b = np.atleast_2d(np.asarray(pred_a)), np.atleast_2d(np.asarray(pred_b))
    if seeds_a.shape != seeds_b.shape:
        raise ValueError(f"pred_a and pred_b differ in shape: {seeds_a.shape} and {seeds_b.shape}")
    checked = [_check(gold, [a, b], num_classes) for a, b in zip(seeds_a, seeds_b)]
    gold_arr = checked[0][0]
    k2 = num_classes**2
    # One resample of row indices serves both systems (and every seed), so their shared difficulty cancels out.
    cells = [(gold_arr * num_classes + a, gold_arr * num_classes + b) for _, a, b in checked]
    rng = np.random.default_rng(seed)
    n = gold_arr.size
    deltas = []
    chunk = max(1, _BOOT_CELLS // n)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        offset = (np.arange(m) * k2)[:, None]
        per_seed = []
        for cells_a, cells_b in cells:
            conf_a, conf_b = (np.bincount((c[idx] + offset).ravel(), minlength=m * k2).reshape(m, num_classes, -1)
                              for c in (cells_a, cells_b))
            per_seed.append(_macro_f1(conf_b) - _macro_f1(conf_a))
        deltas.append(np.mean(per_seed, axis=0))
    low, high = np.percentile(np.concatenate(deltas), [2.5, 97.5])
    point = np.mean([_macro_f1(_confusion(gold_arr, b, num_classes)) - _macro_f1(_confusion(gold_arr, a, num_classes))
                     for _, a, b in checked])
    return {"delta": float(point), "low": float(low), "high": float(high)}
