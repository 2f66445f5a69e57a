"""The training objective of a classification head (--head linear / etf): cross-entropy over the K classes,
logit-adjusted by the training prior where --la_loss_tau is set, and the TC feature of the head's own input.

A head run's rows are their prompts alone (no label tokens): the head reads each row's last real token, which
is also the token the TC feature is pooled from, so the two losses act on the same feature.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ncal_core.data.batching import Batch
from ncal_core.data.prompts import EncodedRow
from ncal_core.loss.objective import ObjectiveOutput
from ncal_core.loss.tc import TCConfig, pool_features
from ncal_core.model.classifier import QwenClassifier
from ncal_core.model.qwen import QwenModel


def prompt_rows(rows: list[EncodedRow]) -> list[EncodedRow]:
    """Rows of prompts alone, as a head trains and predicts on them."""
    return [EncodedRow(r.input_ids[:r.prompt_len], r.prompt_len, r.label_index, r.example_id) for r in rows]


class ClassifierObjective(nn.Module):
    """Decoder + classification head (+ TC feature) of one micro-batch of prompt rows."""

    def __init__(self, classifier: QwenClassifier, *, tc: TCConfig | None = None, padding_free: bool = True,
                 prior_log: Tensor | None = None, la_tau: float = 0.0) -> None:
        """tc: the TC feature's settings (its pooling is the head's token), None without the TC loss;
        prior_log [K]: the training log prior, added times la_tau to the logits of the loss."""
        super().__init__()
        self.classifier = classifier
        self.tc = tc
        self.padding_free = padding_free
        self.register_buffer("adjustment", None if prior_log is None or not la_tau else la_tau * prior_log,
                             persistent=False)

    @property
    def model(self) -> QwenModel:
        """The decoder, as TrainingObjective.model (LoRA, checkpoints and the FLOP count read it)."""
        return self.classifier.model

    @property
    def scorer(self) -> QwenClassifier:
        """What evaluation scores the classes with: the classifier."""
        return self.classifier

    def forward(self, batch: Batch) -> ObjectiveOutput:
        """One right-padded micro-batch of prompt rows: ObjectiveOutput with the summed CE over its rows."""
        logits, pooled = self.classifier(batch.input_ids, batch.seq_lens,
                                         ragged=batch.ragged if self.padding_free else None)
        if self.adjustment is not None:
            logits = logits + self.adjustment
        ce_sum = F.cross_entropy(logits, batch.class_ids, reduction="sum")
        z = None
        if self.tc:
            # the clamp of the TC feature on the head's input: pooling "last" over one marked token a row
            z = pool_features(pooled[:, None], batch.class_ids.new_ones(len(pooled), 1), "last", e_w=self.tc.e_w,
                              backend=self.tc.backend, async_checks=True)
        return ObjectiveOutput(ce_sum, z, None, batch.class_ids)
