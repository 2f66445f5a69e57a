"""Scoring an evaluation set and writing its report: eval.json, the printed tables and the pictures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ncal_core.data.prompts import PromptBuilder
from ncal_core.data.rows import Example
from ncal_core.distributed import gather_shards, shard
from ncal_core.durable import write_json
from ncal_core.evaluation.classify import classify
from ncal_core.evaluation.collapse import neural_collapse
from ncal_core.evaluation.features import pooled_features
from ncal_core.evaluation.metrics import classification_report, format_report, weighted_macro_f1
from ncal_core.evaluation.scoring import score_labels
from ncal_core.evaluation.tau_choice import TAU_GRID, choose_tau, dev_row_weights
from ncal_core.loss.logit_adjustment import adjust_scores
from ncal_core.loss.tc import TCConfig
from ncal_core.model.classifier import QwenClassifier
from ncal_core.model.qwen import QwenModel


def evaluate(model: QwenModel | QwenClassifier, builder: PromptBuilder, rows: Sequence[Example], *, tc: TCConfig,
             batch_size: int = 32, prior_log: Tensor | None = None, tau: float | None = 0.0,
             weighting: str | None = None, rank: int = 0, world: int = 1) -> tuple[dict[str, Any], Tensor]:
    """Constrained label scoring (or a classifier's logits) of labelled rows -> (classification report with NC
    figures, TC features [N, H]).

    With `tau`, the label scores are logit-adjusted (minus tau * the training log prior) before the argmax;
    tau None chooses it on these rows, which are then a development split (evaluation.tau_choice), by
    `weighting`. Given a weighting, the report also holds the weighted macro-F1 a development split chooses by.
    Under several processes (a process group of `world` ranks) each rank scores its shard of the rows and
    every rank gets the whole report.
    """
    was_training = model.training
    model.eval()
    gold = [builder.labels.index(row.label) for row in rows]
    mine = builder.encode_all([rows[i] for i in shard(len(rows), rank, world)])  # tokenized once, in one batch
    prompts = [row.input_ids[:row.prompt_len] for row in mine]
    if isinstance(model, QwenClassifier):  # one forward a row: the head's logits and its input, the TC feature
        scores, features = classify(model, prompts, builder.tokenizer.pad_token_id, batch_size, tc.e_w)
    else:
        scores = score_labels(model, prompts, builder.label_ids, batch_size=batch_size).cpu()
        features = pooled_features(model, mine, builder.tokenizer.pad_token_id, tc, batch_size)
    scores = gather_shards(scores, len(rows), world)
    features = gather_shards(features, len(rows), world)
    model.train(was_training)
    plain = classification_report(gold, scores.argmax(dim=1).tolist(), builder.labels)
    choice: dict[str, Any] = {}
    if weighting or tau is None:
        weights = dev_row_weights(gold, len(builder.labels), weighting or "balanced")
    if tau is None:
        tau, by_tau = choose_tau(scores, gold, prior_log.cpu(), weights)
        choice = {"tau_chosen_on_these_rows": dict(zip(map(str, TAU_GRID), by_tau))}
    if tau:
        scores = adjust_scores(scores, prior_log.cpu(), tau)
    predictions = scores.argmax(dim=1).tolist()
    report = classification_report(gold, predictions, builder.labels)
    report["logit_adjust_tau"] = tau
    report.update(choice)
    if weighting:
        report["dev_weighting"] = weighting
        report["weighted_macro_f1"] = weighted_macro_f1(gold, predictions, len(builder.labels), weights)
    report["unadjusted"] = {"accuracy": plain["accuracy"], "macro_f1": plain["macro_f1"]}
    present = len(set(gold))
    if present >= 2:
        report["neural_collapse"] = neural_collapse(features, torch.tensor(gold), len(builder.labels))
    else:  # accuracy and per-class figures still hold for rows of one class
        report["skipped"] = {"neural_collapse": f"needs rows of at least 2 classes; these hold {present}",
                             "sphere.png": "the class-mean sphere needs rows of at least 2 classes"}
    return report, features


def write_report(output_dir: Path, report: dict[str, Any], features: Tensor, gold: Sequence[int],
                 labels: list[str]) -> None:
    """eval.json, the tables on stdout, and sphere / F1 / training-curve pictures in output_dir."""
    from ncal_core.evaluation.plots import (  # matplotlib only when a report is made
        f1_bars,
        sphere_plot,
        training_curves,
    )

    write_json(output_dir / "eval.json", report)
    print(format_report(report))
    if report.get("logit_adjust_tau"):
        print(f"(label scores logit-adjusted with tau {report['logit_adjust_tau']}; without: accuracy "
              f"{report['unadjusted']['accuracy']:.4f}, macro-F1 {report['unadjusted']['macro_f1']:.4f})")
    if "neural_collapse" in report:
        nc = report["neural_collapse"]
        print(f"NC1 {nc['nc1']:.4f}   NC2 cos {nc['nc2_cos_mean']:.4f} ± {nc['nc2_cos_std']:.4f} "
              f"(ETF {nc['etf_cos']:.4f})   equinorm CV {nc['equinorm_cv']:.4f}")
        sphere_plot(features, torch.tensor(list(gold)), labels, output_dir / "sphere.png")
    for what, why in report.get("skipped", {}).items():
        print(f"skipped {what}: {why}")
    f1_bars(report, output_dir / "per_class_f1.png")
    if (output_dir / "metrics.jsonl").is_file():
        training_curves(output_dir / "metrics.jsonl", output_dir / "training_curves.png")
