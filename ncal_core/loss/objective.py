"""The training objective around the decoder: label-only LM loss and the pooled TC feature.

Wrapping both in one module means DDP sees a single forward that uses every trainable weight.
The LM head runs only at the positions that predict label tokens, so the [B, T, V] logits
tensor never exists (with Qwen's 151,936-token vocabulary it dominates time and memory); on the CPU its
weight is pre-packed where that pays (model.head).
With padding_free the decoder skips the micro-batch's padding (layout.Ragged), so a random batch
costs its real tokens, not its rows times its longest row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncal_core.data.batching import Batch
from ncal_core.loss.logit_adjustment import LabelDecisions, decision_scores
from ncal_core.loss.tc import TCConfig, tc_features
from ncal_core.model.head import LabelHead, packing_pays
from ncal_core.model.qwen import QwenModel


def compile_layers(model: QwenModel, backend: str | object = "inductor") -> None:
    """torch.compile each decoder layer's work before and after attention, with sizes dynamic from the first call.

    Padding-free batches change the token count, the number of attention blocks and their widths at every step.
    Attention itself stays eager: it is one SDPA call per block, and its Python loop over the blocks would make
    a compiled layer specialise on the block count. The compiled parts see only [N, H]-shaped tensors, so one
    graph serves every layout (static sizes would make each new layout a new graph: minutes each with inductor,
    then dynamo's recompile limit and a silent fall-back to eager).
    """
    for layer in model.layers:
        layer.attention_in = torch.compile(layer.attention_in, backend=backend, dynamic=True)
        layer.attention_out = torch.compile(layer.attention_out, backend=backend, dynamic=True)


class ObjectiveOutput(NamedTuple):
    """What one micro-batch gives the loop, in the batch's row order."""

    lm_sum: Tensor                   # summed CE over every target token of the batch
    z: Tensor | None                 # [B, H] fp32 TC features, when TC is on
    decision_scores: Tensor | None   # [B, D, C] logits of the candidates at the gold label's decisions
    class_ids: Tensor                # [B]


class TrainingObjective(nn.Module):
    """Decoder + label-only head (+ TC feature) of one micro-batch."""

    def __init__(self, model: QwenModel, *, tc: TCConfig | None = None, padding_free: bool = True,
                 decisions: LabelDecisions | None = None) -> None:
        """tc: the TC feature's settings, None without the TC loss; decisions: the labels' token decisions
        (logit_adjustment.label_decisions); given, the output carries the rows' decision_scores."""
        super().__init__()
        self.model = model
        self.head = LabelHead(model.lm_head, pack=packing_pays(model))
        self.decisions = decisions
        self.padding_free = padding_free
        self.tc = tc

    @property
    def scorer(self) -> QwenModel:
        """What evaluation scores the labels with: the decoder and its LM head."""
        return self.model

    def forward(self, batch: Batch) -> ObjectiveOutput:
        """One right-padded micro-batch."""
        # either path needs no padding mask: a real token never attends to the pads after it, so the causal
        # mask alone gives every real position the output it has with the mask, on SDPA's faster is_causal path
        hidden = self.model(batch.input_ids, ragged=batch.ragged if self.padding_free else None)  # [B, T, H]
        logits = self.head(hidden.reshape(-1, hidden.shape[-1])[batch.query]).float()  # [N, V]
        lm_sum = F.cross_entropy(logits, batch.input_ids.reshape(-1)[batch.target], reduction="sum")
        chosen = None
        if self.decisions is not None:
            # each row's first query; every training row has targets (label tokens and eos)
            n_targets = batch.seq_lens - batch.prompt_lens
            chosen = decision_scores(logits, torch.cumsum(n_targets, 0) - n_targets, batch.class_ids, self.decisions)
        z = tc_features(hidden, batch, self.tc, async_checks=True) if self.tc else None  # [B, H] fp32
        return ObjectiveOutput(lm_sum, z, chosen, batch.class_ids)
