"""Scoring an evaluation set and writing its report: eval.json, the printed tables and the pictures."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ncal_core.collapse import neural_collapse
from ncal_core.metrics import classification_report, format_report
from ncal_core.model import QwenModel
from ncal_core.scoring import score_labels


def evaluate(model: QwenModel, prompts: Sequence[list[int]], gold: Sequence[int], label_ids: Sequence[list[int]],
             labels: list[str], batch_size: int = 32) -> tuple[dict[str, Any], Tensor]:
    """Constrained label scoring of `prompts` -> (classification report, last-prompt-token features [N, H])."""
    was_training = model.training
    model.eval()
    scores, features = score_labels(model, prompts, label_ids, batch_size=batch_size, return_features=True)
    model.train(was_training)
    report = classification_report(list(gold), scores.argmax(dim=1).tolist(), labels)
    report["neural_collapse"] = neural_collapse(features.cpu(), torch.tensor(list(gold)), len(labels))
    return report, features.cpu()


def write_report(output_dir: Path, report: dict[str, Any], features: Tensor, gold: Sequence[int],
                 labels: list[str]) -> None:
    """eval.json, the tables on stdout, and sphere / F1 / training-curve pictures in output_dir."""
    from ncal_core.plots import f1_bars, sphere_plot, training_curves  # matplotlib only when a report is made

    (output_dir / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    print(format_report(report))
    nc = report["neural_collapse"]
    print(f"NC1 {nc['nc1']:.4f}   NC2 cos {nc['nc2_cos_mean']:.4f} ± {nc['nc2_cos_std']:.4f} "
          f"(ETF {nc['etf_cos']:.4f})   equinorm CV {nc['equinorm_cv']:.4f}")
    sphere_plot(features, torch.tensor(list(gold)), labels, output_dir / "sphere.png")
    f1_bars(report, output_dir / "per_class_f1.png")
    if (output_dir / "metrics.jsonl").is_file():
        training_curves(output_dir / "metrics.jsonl", output_dir / "training_curves.png")
