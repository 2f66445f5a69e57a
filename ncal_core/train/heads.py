"""A head run's (--head linear / etf) own parts of the loop: its objective, and its weights saved and loaded back."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ncal_core.errors import NCALError
from ncal_core.loss.classifier_objective import ClassifierObjective
from ncal_core.loss.tc import TCConfig, simplex_etf
from ncal_core.model.classifier import QwenClassifier, attach_head, load_adapter_head, load_classifier_weights
from ncal_core.model.lora import load_adapter_weights
from ncal_core.model.qwen import QwenModel
from ncal_core.train.config import TrainConfig


def head_objective(cfg: TrainConfig, model: QwenModel, num_classes: int, prior_log: Tensor, tc: TCConfig | None,
                   resume: Path | None, use_lora: bool) -> ClassifierObjective:
    """The objective of a new head on the decoder, or of the head a checkpoint to resume holds."""
    hidden = model.config.hidden_size
    if cfg.head == "etf" and hidden < num_classes:
        raise NCALError(f"--head etf: a simplex ETF of {num_classes} classes needs hidden size >= {num_classes}, "
                        f"not {hidden}")
    frame = simplex_etf(num_classes, hidden, cfg.seed) if cfg.head == "etf" else None
    classifier = attach_head(model, num_classes, cfg.head, cfg.seed, frame)
    if resume:
        restore_classifier(classifier, resume, use_lora)
    return ClassifierObjective(classifier, tc=tc, padding_free=cfg.padding_free, prior_log=prior_log,
                               la_tau=cfg.la_loss_tau)


def restore_classifier(classifier: QwenClassifier, folder: Path, use_lora: bool) -> None:
    """A checkpoint's weights into the classifier in place: its adapter and head, or every weight."""
    if not use_lora:
        load_classifier_weights(classifier, folder)
        return
    load_adapter_weights(classifier.model, folder)
    load_adapter_head(classifier, folder)

