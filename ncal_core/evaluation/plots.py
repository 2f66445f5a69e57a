"""PNG figures of a run: features on a sphere, per-class F1, training curves, method comparison.

Figures are built with matplotlib's object API (`Figure` + `savefig`), which draws with
Agg and never touches pyplot's global backend or a display.
"""

from __future__ import annotations

import functools
import json
import math
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib import font_manager
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font
from matplotlib.patches import Rectangle
from torch import Tensor

from ncal_core.errors import NCALError, at
from ncal_core.evaluation.collapse import class_geometry
from ncal_core.evaluation.metrics import display_width

# Debian's smallest font with the GB2312 characters (1.6 MB download); fonts-noto-cjk works too.
CJK_FONT_PACKAGE = "fonts-wqy-microhei"

# Training-curve panels: title, then the metrics.jsonl keys drawn on it.
_CURVE_PANELS = [
    ("loss", ["loss", "lm_loss"]),
    ("TC loss", ["tc_loss"]),
    ("learning rate", ["lr"]),
    ("evaluation", ["eval_macro_f1", "eval_accuracy"]),
]


@functools.lru_cache(maxsize=None)
def _open_font(path: str) -> FT2Font | None:
    """The font file at `path` (its first face), or None if FreeType cannot read it."""
    try:
        return FT2Font(path)
    except (OSError, RuntimeError, ValueError):  # a broken or unsupported font file is just not a candidate
        return None


def _has_glyphs(path: str, chars: frozenset[str]) -> bool:
    """Whether the font file at `path` maps every character of `chars` to a glyph."""
    font = _open_font(path)
    return font is not None and all(font.get_char_index(ord(ch)) for ch in chars)


@functools.lru_cache(maxsize=None)
def _font_for(chars: frozenset[str]) -> str | None:
    """Family name of an installed font that has every character of `chars`, preferring regular sans faces."""
    entries = sorted(font_manager.fontManager.ttflist,
                     key=lambda e: (e.style != "normal", abs(e.weight - 400) if isinstance(e.weight, int) else 0,
                                    "Serif" in e.name, "Mono" in e.name, e.name))
    for entry in entries:
        # Last Resort maps every code point to a placeholder box: the tofu this search avoids.
        if not entry.name.startswith("Last Resort") and _has_glyphs(entry.fname, chars):
            return entry.name
    # matplotlib caches its font list, so a font installed after that cache was built is found only on disk.
    known = {e.fname for e in entries}
    for path in font_manager.findSystemFonts():
        if path not in known and _has_glyphs(path, chars):
            font_manager.fontManager.addfont(path)
            return font_manager.FontProperties(fname=path).get_name()
    return None


@functools.cache
def _say_once(message: str) -> None:
    """Print a message the first time only (every picture of a report would repeat it)."""
    print(message)


@contextmanager
def _text_setting(names: Sequence[str], prefix: str, noun: str) -> Iterator[tuple[list[str], str]]:
    """Matplotlib settings under which `names` render; yields the names to draw and a caption for them.

    Characters the default font lacks (Chinese class names) are drawn with a font found
    on this machine, as matplotlib's per-glyph fallback behind the default. Without one,
    names become `<prefix>0`, `<prefix>1`, ... (never tofu boxes), the caption says so and
    the mapping is printed.
    """
    default_path = font_manager.findfont(font_manager.FontProperties())
    missing = frozenset(ch for ch in "".join(names) if not _has_glyphs(default_path, frozenset(ch)))
    shown, caption, settings = list(names), noun, {}
    if missing:
        extra = _font_for(missing)
        if extra is None:
            shown = [f"{prefix}{i}" for i in range(len(names))]
            caption = f"{noun} ({prefix}i = the i-th; no installed font draws the names)"
            _say_once(f"plots: no installed font draws {''.join(sorted(missing))}, so the figures show "
                      + ", ".join(f"{alias} = {name}" for alias, name in zip(shown, names))
                      + f" (the Debian package {CJK_FONT_PACKAGE} brings such a font)")
        else:
            settings = {"font.family": [font_manager.FontProperties(fname=default_path).get_name(), extra]}
    with matplotlib.rc_context(settings):
        yield shown, caption


def _name_ticks(ax: Axes, names: list[str]) -> None:
    """Names under bars at 0, 1, ..., slanted when the longest would not fit the room each bar has."""
    slot_inches = ax.figure.get_figwidth() * ax.get_position().width / len(names)
    # At 10 pt a Latin character is ~5.5 pt wide and a CJK one (two cells) 10 pt: ~13 cells an inch.
    slanted = max(map(display_width, names)) > 13 * slot_inches
    ax.set_xticks(range(len(names)), names, rotation=30 if slanted else 0, ha="right" if slanted else "center",
                  rotation_mode="anchor")


def _label_bar(ax: Axes, bar: Rectangle, top: float, text: str) -> None:
    """Write `text` just above height `top` over the middle of `bar`."""
    ax.annotate(text, (bar.get_x() + bar.get_width() / 2, top), xytext=(0, 2), textcoords="offset points",
                ha="center", va="bottom", fontsize=8)


def _save(fig: Figure, path: str | Path) -> None:
    """Write `fig` as a PNG at `path`, creating its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")


def _colours(k: int) -> list[tuple[float, float, float, float]]:
    """K distinct colours, the same class colour in every figure."""
    cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]


def _sphere_basis(centred_means: Tensor, centred_features: Tensor) -> Tensor:
    """Three orthonormal directions `[3, H]`: PCA of the class means, topped up from the features."""
    _, s, vh = torch.linalg.svd(centred_means, full_matrices=False)
    basis = vh[s > s[0] * 1e-9][:3]
    if basis.shape[0] < 3:
        # Two or three classes span fewer than three directions: add the features' widest remaining ones.
        rest = centred_features - centred_features @ basis.T @ basis
        basis = torch.cat([basis, torch.linalg.svd(rest, full_matrices=False)[2][: 3 - basis.shape[0]]])
    return basis


def sphere_plot(features: Tensor, class_ids: Tensor, labels: list[str], path: str | Path) -> None:
    """Features `[N, H]` with ids `[N]` on the unit sphere, like Figure 1 of the NCAL paper.

    The L2-normalised features are centred on the mean of the class means and projected
    on the three leading principal directions of the centred class means (so the class
    geometry, not the within-class spread, picks the view), then scaled to unit length.
    Each class's arrow is the mean of its points on the sphere: it reaches the sphere
    only when the class has collapsed to one direction.
    """
    if features.dim() != 2 or features.shape[1] < 3:
        raise ValueError(f"sphere_plot needs features [N, H] with H >= 3, got {tuple(features.shape)}")
    geo = class_geometry(features, class_ids, len(labels))
    centred = geo.features - geo.centre
    points = centred @ _sphere_basis(geo.means - geo.centre, centred).T
    points = (points / points.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()
    rows = geo.rows.numpy()
    colours = _colours(len(labels))

    with _text_setting(labels, "C", "class") as (names, caption):
        fig = Figure(figsize=(9.5, 7.5))
        ax = fig.add_subplot(projection="3d", computed_zorder=False)
        u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 37), np.linspace(0, np.pi, 19))
        ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v),
                          color="0.6", alpha=0.25, linewidth=0.5)
        for slot, class_id in enumerate(geo.present.tolist()):
            mine = points[rows == slot]
            ax.scatter(*mine.T, s=14, alpha=0.75, color=colours[class_id], depthshade=False,
                       label=f"{names[class_id]} (n={len(mine)})")
            ax.quiver(0, 0, 0, *mine.mean(axis=0), color=colours[class_id], linewidth=2.5, arrow_length_ratio=0.12)
        ax.set(xlim=(-1, 1), ylim=(-1, 1), zlim=(-1, 1))
        ax.set_box_aspect((1, 1, 1), zoom=1.25)
        ax.set_axis_off()
        fig.suptitle("Features on the unit sphere (3-D PCA of the class means; arrows: class centres)")
        fig.legend(loc="center left", bbox_to_anchor=(0.76, 0.5), title=textwrap.fill(caption, 26), markerscale=1.8,
                   frameon=False)
        fig.subplots_adjust(left=0.0, right=0.78, top=0.95, bottom=0.0)
        _save(fig, path)


def f1_bars(report: dict, path: str | Path) -> None:
    """Per-class F1 bars annotated with support, from a classification_report dict."""
    labels = report["labels"]
    per_class = [report["per_class"][label] for label in labels]
    f1 = [row["f1"] for row in per_class]
    with _text_setting(labels, "C", "class") as (names, caption):
        fig = Figure(figsize=(max(6.0, 0.95 * len(labels) + 2.0), 4.8))
        ax = fig.add_subplot()
        bars = ax.bar(range(len(labels)), f1, color=_colours(len(labels)), width=0.7)
        for bar, row in zip(bars, per_class):
            _label_bar(ax, bar, row["f1"], f"{row['f1']:.2f}\nn={row['support']}")
        ax.axhline(report["macro_f1"], color="0.3", linestyle="--", linewidth=1,
                   label=f"macro-F1 {report['macro_f1']:.3f}")
        _name_ticks(ax, names)
        ax.set(ylim=(0, 1.18), xlabel=caption, ylabel="F1",
               title=f"Per-class F1 (accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f})")
        ax.legend(loc="upper right", frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        _save(fig, path)


def _read_metrics(metrics_jsonl: str | Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl, one a line (blank lines skipped)."""
    records = []
    with open(metrics_jsonl, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise NCALError(f"{at(metrics_jsonl, line_no)}: not JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise NCALError(f"{at(metrics_jsonl, line_no, 'step')}: need a JSON object with an integer step")
            records.append(record)
    return records


def training_curves(metrics_jsonl: str | Path, path: str | Path) -> None:
    """Loss, TC loss, learning rate and eval scores against step from a run's metrics.jsonl, as present."""
    records = _read_metrics(metrics_jsonl)

    def series(key: str, split: str | None) -> tuple[list[int], list[float]]:
        pairs = [(r["step"], r[key]) for r in records if r.get("split") == split
                 and isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]
        return [s for s, _ in pairs], [float(v) for _, v in pairs]

    # evaluations name their split (dev each epoch, test once at the end): one line per key and split
    splits = sorted({r.get("split") for r in records}, key=str)
    panels = [(title, [(key if split is None else f"{split} {key.removeprefix('eval_')}", *series(key, split))
                       for key in keys for split in splits]) for title, keys in _CURVE_PANELS]
    panels = [(title, [line for line in lines if line[1]]) for title, lines in panels]
    panels = [(title, lines) for title, lines in panels if lines]
    if not panels:
        raise NCALError(f"{metrics_jsonl}: no step has any of "
                        + ", ".join(key for _, keys in _CURVE_PANELS for key in keys))
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.0 * cols, 3.4 * rows))
    for i, (title, lines) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key, steps, values in lines:
            # Eval points are few and far apart: markers show where they were taken.
            ax.plot(steps, values, label=key, linewidth=1.2, marker="o" if len(steps) <= 30 else None, markersize=3)
        ax.set(title=title, xlabel="step")
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def comparison_plot(rows: list[dict], path: str | Path) -> None:
    """Macro-F1 and accuracy bars (mean, std error bars) per method, one row per method."""
    keys = ["method", "macro_f1_mean", "macro_f1_std", "accuracy_mean", "accuracy_std"]
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"comparison row {i} lacks {', '.join(missing)}")
    if not rows:
        raise ValueError("comparison_plot needs at least one row")
    with _text_setting([row["method"] for row in rows], "M", "method") as (names, caption):
        # one line a method, top to bottom in table order, so that tens of methods stay readable
        fig = Figure(figsize=(9.0, max(4.2, 0.42 * len(rows) + 1.6)))
        ax = fig.add_subplot()
        y = np.arange(len(rows))
        for offset, metric, colour in ((-0.19, "macro_f1", "tab:blue"), (0.19, "accuracy", "tab:orange")):
            means = [row[f"{metric}_mean"] for row in rows]
            stds = [row[f"{metric}_std"] for row in rows]
            ax.barh(y + offset, means, 0.36, xerr=stds, capsize=3, color=colour,
                    label=metric.replace("_f1", "-F1"), error_kw={"linewidth": 1})
            for pos, mean, std in zip(y + offset, means, stds):
                ax.annotate(f"{mean:.3f} ± {std:.3f}", (mean + std, pos), xytext=(3, 0), textcoords="offset points",
                            ha="left", va="center", fontsize=7)
        right = max(row[f"{m}_mean"] + row[f"{m}_std"] for row in rows for m in ("macro_f1", "accuracy"))
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set(xlim=(0, right * 1.25 or 1.0), ylabel=caption, xlabel="score")
        ax.set_title("Methods compared (mean ± std over seeds)", pad=24)
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        _save(fig, path)
