"""Constrained label scoring (METHOD.md §1): log p(label + eos | prompt) for every class, prompt encoded once.

Each row becomes one packed sequence: the prompt, then the K label continuations side by side.
A block attention mask lets every continuation see the prompt and its own earlier tokens only,
and its position ids restart where the prompt ends, so one forward pass gives exactly what K
separate `prompt + label` passes would, without recomputing the prompt K times.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ncal_core.data.batching import EVAL_TOKENS, token_bounded
from ncal_core.model.qwen import QwenModel

# fp32 logits per chunk of the vocabulary: small enough to stay near the cache, wide enough for a full-speed matmul
HEAD_CHUNK_BYTES = 8 * 2**20


def _pack_row(prompt: list[int], label_ids: Sequence[list[int]]) -> tuple[list[int], list[int], list[int]]:
    """Token ids, position ids and the query positions (one per label token) of one packed row."""
    ids = list(prompt)
    pos = list(range(len(prompt)))
    queries: list[int] = []
    for label in label_ids:
        start = len(ids)
        queries.append(len(prompt) - 1)
        # the segment feeds label[:-1]; its outputs predict label[1:]
        for j, tok in enumerate(label[:-1]):
            ids.append(tok)
            pos.append(len(prompt) + j)
            queries.append(start + j)
    return ids, pos, queries


def _block_mask(prompt_len: int, label_ids: Sequence[list[int]], total: int) -> Tensor:
    """[total, total] bool: causal over the prompt; each continuation sees the prompt and itself causally."""
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[:prompt_len, :prompt_len] = torch.ones(prompt_len, prompt_len, dtype=torch.bool).tril()
    start = prompt_len
    for label in label_ids:
        n = len(label) - 1
        if n:
            mask[start:start + n, :prompt_len] = True
            mask[start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        start += n
    return mask


def token_log_probs(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """log softmax(hidden @ weight.T)[i, targets[i]] for each row [n], the vocabulary taken HEAD_CHUNK_BYTES of
    fp32 logits at a time: each chunk's log-sum-exp, then theirs. The [n, V] logits are never whole in memory
    (at Qwen's 151,936-token vocabulary, a batch of 32 prompts with 7 labels' tokens is 547 MB of them, and a
    log-softmax as much again), and the head's weight is read once."""
    n, vocab = len(hidden), weight.shape[0]
    cols = max(1, HEAD_CHUNK_BYTES // (4 * n))
    chunk_lse, target_logit = [], torch.zeros(n, dtype=torch.float32, device=hidden.device)
    for first in range(0, vocab, cols):
        logits = F.linear(hidden, weight[first:first + cols]).float()
        chunk_lse.append(torch.logsumexp(logits, dim=-1))
        # no data-dependent shapes: nothing waits for the device
        local = (targets - first).clamp(0, logits.shape[1] - 1)
        inside = (targets >= first) & (targets < first + logits.shape[1])
        target_logit = torch.where(inside, logits.gather(1, local[:, None]).squeeze(1), target_logit)
    return target_logit - torch.logsumexp(torch.stack(chunk_lse, dim=1), dim=1)


@torch.no_grad()
def score_labels(model: QwenModel, prompts: Sequence[list[int]], label_ids: Sequence[list[int]],
                 batch_size: int = 16) -> Tensor:
    """Summed log-probabilities [N, K] of each label continuation (label tokens + eos) after each prompt."""
    device = next(model.parameters()).device
    targets = torch.tensor([t for label in label_ids for t in label], device=device)
    owner = torch.tensor([c for c, label in enumerate(label_ids) for _ in label], device=device)
    num_classes = len(label_ids)
    continuations = sum(len(label) - 1 for label in label_ids)
    lengths = [len(prompt) + continuations for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    scores = torch.empty(len(prompts), num_classes, dtype=torch.float32, device=device)
    # at most batch_size prompts and EVAL_TOKENS padded tokens a forward
    for rows in (part for first in range(0, len(order), batch_size)
                 for part in token_bounded(order[first:first + batch_size], lengths, EVAL_TOKENS, padded=True)):
        packed = [_pack_row(prompts[i], label_ids) for i in rows]
        width = max(len(ids) for ids, _, _ in packed)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        position_ids = torch.zeros(len(rows), width, dtype=torch.long)
        attn = torch.zeros(len(rows), width, width, dtype=torch.bool)
        # padding queries see only themselves, so no row of the mask is empty
        attn[:, torch.arange(width), torch.arange(width)] = True
        query_index = []
        for r, (ids, pos, queries) in enumerate(packed):
            n = len(ids)
            input_ids[r, :n] = torch.tensor(ids)
            position_ids[r, :n] = torch.tensor(pos)
            attn[r, :n, :n] = _block_mask(len(prompts[rows[r]]), label_ids, n)
            query_index.append(torch.tensor(queries) + r * width)
        hidden = model(input_ids.to(device), position_ids=position_ids.to(device), attn_mask=attn.to(device))
        flat = hidden.reshape(-1, hidden.shape[-1])
        picked = flat[torch.cat(query_index).to(device)]                       # [b * L, H]
        token_logp = token_log_probs(picked, model.lm_head.weight, targets.repeat(len(rows))).view(len(rows), -1)
        per_class = torch.zeros(len(rows), num_classes, device=device).index_add_(1, owner, token_logp)
        scores[torch.tensor(rows, device=device)] = per_class
    return scores


def ensemble_log_probs(score_sets: Sequence[Tensor]) -> Tensor:
    """Several models' label scores [N, K] as one: label log-probabilities [N, K] proportional to the geometric
    mean of the models' label probabilities (the mean of their log-softmax over the K labels)."""
    return torch.stack([torch.log_softmax(scores.float(), dim=1) for scores in score_sets]).mean(0).log_softmax(1)
