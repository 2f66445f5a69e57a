"""Greedy free generation, for parity with the reference's generate-then-parse evaluation."""

from __future__ import annotations

from collections.abc import Collection

import torch

from ncal_core.model.qwen import QwenModel


@torch.no_grad()
def greedy_generate(model: QwenModel, prompt: list[int], eos_ids: Collection[int],
                    max_new_tokens: int = 16) -> list[int]:
    """New token ids after `prompt`, decoded greedily until any of `eos_ids` (excluded) or `max_new_tokens`.

    Labels are a few tokens long, so each step simply reruns the sequence instead of keeping a cache.
    """
    device = next(model.parameters()).device
    ids = list(prompt)
    new: list[int] = []
    for _ in range(max_new_tokens):
        hidden = model(torch.tensor([ids], device=device))
        token = int(model.lm_head(hidden[0, -1]).argmax())
        if token in eos_ids:
            break
        new.append(token)
        ids.append(token)
    return new
