"""A classification head's logits and pooled features for every prompt: one forward per row, no label scoring."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ncal_core.data.batching import ATTENTION_BLOCKS, EVAL_TOKENS, LengthGroupedBatches, collate, token_bounded
from ncal_core.data.prompts import EncodedRow
from ncal_core.loss.tc import pool_features
from ncal_core.model.classifier import QwenClassifier


@torch.no_grad()
def classify(classifier: QwenClassifier, prompts: Sequence[list[int]], pad_id: int, batch_size: int = 32,
             e_w: float = 1.0) -> tuple[Tensor, Tensor]:
    """(logits [N, K] fp32, features [N, H] fp32 norm-clamped to e_w, the TC feature of a head run), on the host,
    in the prompts' order."""
    device = classifier.score.weight.device
    logits = torch.empty(len(prompts), classifier.score.weight.shape[0])
    features = torch.empty(len(prompts), classifier.config.hidden_size)
    rows = [EncodedRow(list(p), len(p), -1, "") for p in prompts]
    lengths = [len(p) for p in prompts]
    order = LengthGroupedBatches(lengths, batch_size, shuffle=False)  # longest first, as collate sorts them
    for index in (part for batch in order for part in token_bounded(batch, lengths, EVAL_TOKENS)):
        batch = collate([rows[i] for i in index], pad_id, ATTENTION_BLOCKS).to(device)
        out, pooled = classifier(batch.input_ids, batch.seq_lens, ragged=batch.ragged)
        z = pool_features(pooled[:, None], torch.ones(len(index), 1, dtype=torch.bool, device=device), "last",
                          e_w=e_w, backend="torch")
        logits[torch.tensor(index)] = out.float().cpu()
        features[torch.tensor(index)] = z.float().cpu()
    return logits, features
