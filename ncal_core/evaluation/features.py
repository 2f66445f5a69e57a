"""The TC feature of every row, pooled exactly as training pools it, for evaluation and analysis."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ncal_core.data.batching import ATTENTION_BLOCKS, EVAL_TOKENS, LengthGroupedBatches, collate, token_bounded
from ncal_core.data.prompts import EncodedRow
from ncal_core.loss.tc import TCConfig, tc_features
from ncal_core.model.qwen import QwenModel


@torch.no_grad()
def pooled_features(model: QwenModel, rows: Sequence[EncodedRow], pad_id: int, tc: TCConfig,
                    batch_size: int = 32) -> Tensor:
    """Features [N, H] (fp32, norm-clamped to e_w) of encoded rows, in the rows' order.

    Rows carry their gold label when it is known, which only `seq_last` reads.
    """
    device = next(model.parameters()).device
    out = torch.empty(len(rows), model.config.hidden_size)
    lengths = [len(r.input_ids) for r in rows]
    order = LengthGroupedBatches(lengths, batch_size, shuffle=False)
    for index in (part for batch in order for part in token_bounded(batch, lengths, EVAL_TOKENS)):
        # padding-free, as training runs: a padded batch of 32 long rows holds [32, T, I] MLP temporaries
        batch = collate([rows[i] for i in index], pad_id, ATTENTION_BLOCKS).to(device)
        hidden = model(batch.input_ids, ragged=batch.ragged)
        z = tc_features(hidden, batch, replace(tc, backend="torch"))  # no gradient here: no fused kernel needed
        out[torch.tensor(index)] = z.float().cpu()
    return out

