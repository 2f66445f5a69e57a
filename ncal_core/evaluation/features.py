"""The TC feature of every row, pooled exactly as training pools it, for evaluation and analysis."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ncal_core.data.batching import ATTENTION_BLOCKS, LengthGroupedBatches, collate
from ncal_core.data.prompts import EncodedRow
from ncal_core.loss.tc import TCConfig, tc_features
from ncal_core.model.qwen import QwenModel

# tokens per forward: the MLP's temporaries of one forward are ~3 * I fp32 values a token (at Qwen2.5-0.5B's
# shapes 57 KB), so 1,024 tokens keep them near a training step's, where 32 long rows took 310 MB more
FEATURE_TOKENS = 1024


@torch.no_grad()
def pooled_features(model: QwenModel, rows: Sequence[EncodedRow], pad_id: int, tc: TCConfig,
                    batch_size: int = 32) -> Tensor:
    """Features [N, H] (fp32, norm-clamped to e_w) of encoded rows, in the rows' order.

    Rows carry their gold label when it is known, which only `seq_last` reads.
    """
    device = next(model.parameters()).device
    out = torch.empty(len(rows), model.config.hidden_size)
    order = LengthGroupedBatches([len(r.input_ids) for r in rows], batch_size, shuffle=False)
    for index in (part for batch in order for part in token_bounded(batch, rows)):
        # padding-free, as training runs: a padded batch of 32 long rows holds [32, T, I] MLP temporaries
        batch = collate([rows[i] for i in index], pad_id, ATTENTION_BLOCKS).to(device)
        hidden = model(batch.input_ids, ragged=batch.ragged)
        z = tc_features(hidden, batch, replace(tc, backend="torch"))  # no gradient here: no fused kernel needed
        out[torch.tensor(index)] = z.float().cpu()
    return out


def token_bounded(index: list[int], rows: Sequence[EncodedRow]) -> list[list[int]]:
    """The batch's rows in runs of consecutive rows of at most FEATURE_TOKENS tokens (a longer row alone)."""
    parts: list[list[int]] = [[]]
    tokens = 0
    for i in index:
        n = len(rows[i].input_ids)
        if parts[-1] and tokens + n > FEATURE_TOKENS:
            parts.append([])
            tokens = 0
        parts[-1].append(i)
        tokens += n
    return parts
