"""The training objective around the decoder: label-only LM loss and the pooled TC feature.

Wrapping both in one module means DDP sees a single forward that uses every trainable weight.
The LM head runs only at the positions that predict label tokens, so the [B, T, V] logits
tensor never exists (with Qwen's 151,936-token vocabulary it dominates time and memory).
A micro-batch arrives cut into chunks of rows of similar length (batching.collate_chunks), so a
random batch is not padded to its longest row; the chunks' outputs are joined before any loss
that couples rows (the TC Gram matrix) sees them.
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


def pool_mask(batch: Batch, pooling: str) -> Tensor:
    """[B, T] bool: the tokens the TC feature may be pooled from (METHOD.md §2, step 1)."""
    positions = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)
    if pooling == "seq_last":
        return batch.attention_mask.bool()
    return positions.unsqueeze(0) < batch.prompt_lens.unsqueeze(1)


class ObjectiveOutput(NamedTuple):
    """What one micro-batch gives the loop; rows in the order of its chunks."""

    lm_sum: Tensor              # summed CE over every target token of the batch
    z: Tensor | None            # [B, H] fp32 TC features, when TC is on
    first_logits: Tensor        # [B, V] logits at each row's last prompt token (they predict the label's first token)
    class_ids: Tensor           # [B]


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

    def forward(self, chunks: list[Batch]) -> ObjectiveOutput:
        """One micro-batch, given as right-padded chunks (see batching.collate_chunks)."""
        if not chunks:
            raise ValueError("a micro-batch needs at least one chunk of rows")
        queries, targets, z = [], [], []
        for batch in chunks:
            # right padding: a real token never attends to the pads after it, so the causal mask alone gives
            # every real position the output it has with the padding mask, on SDPA's faster is_causal path
            hidden = self.model(batch.input_ids)                                            # [B, T, H]
            queries.append(hidden.reshape(-1, hidden.shape[-1])[batch.query])
            targets.append(batch.input_ids.reshape(-1)[batch.target])
            if self.use_tc:
                z.append(pool_features(hidden, pool_mask(batch, self.pooling), POOL_MODE[self.pooling], e_w=self.e_w,
                                       backend=self.tc_backend, async_checks=True))         # [B, H] fp32
        # one head call for every chunk: at a large vocabulary each call reads the whole [V, H] weight
        logits = self.model.lm_head(torch.cat(queries)).float()                             # [N, V]
        lm_sum = F.cross_entropy(logits, torch.cat(targets), reduction="sum")
        # each row's first query; every training row has targets (label tokens and eos)
        n_targets = torch.cat([batch.seq_lens - batch.prompt_lens for batch in chunks])
        first_logits = logits[torch.cumsum(n_targets, 0) - n_targets]
        return ObjectiveOutput(lm_sum, torch.cat(z) if z else None, first_logits,
                               torch.cat([batch.class_ids for batch in chunks]))
