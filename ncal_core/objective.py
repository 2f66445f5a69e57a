"""The training objective around the decoder: label-only LM loss and the pooled TC feature.

Wrapping both in one module means DDP sees a single forward that uses every trainable weight.
The LM head runs only at the positions that predict label tokens, so the [B, T, V] logits
tensor never exists (with Qwen's 151,936-token vocabulary it dominates time and memory).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncal_core.batching import Batch
from ncal_core.model import QwenModel
from ncal_core.ncal import pool_features

POOL_MODE = {"last": "last", "seq_last": "last", "mean": "mean"}


def target_index(prompt_lens: Tensor, seq_lens: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Flat indices into [B * T] of the positions that predict a target token, and of those tokens.

    Row b's targets are tokens prompt_len .. seq_len-1, predicted from the position before each.
    Computed on the host from the batch's lengths, so the hot path has no data-dependent sync.
    """
    query, target = [], []
    for b, (p, s) in enumerate(zip(prompt_lens.tolist(), seq_lens.tolist())):
        query.append(torch.arange(p - 1, s - 1) + b * width)
        target.append(torch.arange(p, s) + b * width)
    return torch.cat(query), torch.cat(target)


def pool_mask(batch: Batch, pooling: str) -> Tensor:
    """[B, T] bool: the tokens the TC feature may be pooled from (METHOD.md §2, step 1)."""
    positions = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)
    if pooling == "seq_last":
        return batch.attention_mask.bool()
    return positions.unsqueeze(0) < batch.prompt_lens.unsqueeze(1)


class ObjectiveOutput(NamedTuple):
    """What one micro-batch gives the loop."""

    lm_sum: Tensor              # summed CE over every target token of the batch
    z: Tensor | None            # [B, H] fp32 TC features, when TC is on
    first_logits: Tensor        # [B, V] logits at each row's last prompt token (they predict the label's first token)


class TrainingObjective(nn.Module):
    """Decoder + label-only head (+ TC feature) of one micro-batch."""

    def __init__(self, model: QwenModel, *, use_tc: bool, pooling: str = "last", e_w: float = 1.0,
                 tc_backend: str = "auto") -> None:
        super().__init__()
        self.model = model
        self.use_tc = use_tc
        self.pooling = pooling
        self.e_w = e_w
        self.tc_backend = tc_backend

    def forward(self, batch: Batch, query: Tensor, target: Tensor) -> ObjectiveOutput:
        hidden = self.model(batch.input_ids, attention_mask=batch.attention_mask)       # [B, T, H]
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = self.model.lm_head(flat[query]).float()                                # [N, V]
        lm_sum = F.cross_entropy(logits, batch.input_ids.reshape(-1)[target], reduction="sum")
        n_targets = batch.seq_lens - batch.prompt_lens
        first = torch.cumsum(n_targets, 0) - n_targets                                  # row b's first query
        z = None
        if self.use_tc:
            z = pool_features(hidden, pool_mask(batch, self.pooling), POOL_MODE[self.pooling],
                              e_w=self.e_w, backend=self.tc_backend)                   # [B, H] fp32
        return ObjectiveOutput(lm_sum, z, logits[first])
