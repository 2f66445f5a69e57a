"""Logit adjustment by the training prior (Menon et al. 2021), the long-tail remedy beside the TC loss.

- post-hoc: subtract tau * log prior from the K label scores before the argmax;
- as a training loss: cross-entropy over the labels' scores + tau * log prior, decided token by token where
  labels share a prefix (LabelDecisions).
Re-sampling of training rows, the other remedy, is the sampler's (data.batching.row_weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def log_prior(counts: Sequence[int]) -> Tensor:
    """log of the training class frequencies [K]; a class with no row gets the prior of half a row."""
    counts_t = torch.tensor(counts, dtype=torch.float64).clamp(min=0.5)
    return (counts_t / counts_t.sum()).log().float()


def adjust_scores(scores: Tensor, prior_log: Tensor, tau: float) -> Tensor:
    """Post-hoc logit adjustment: scores [N, K] - tau * log prior [K]."""
    return scores - tau * prior_log.to(scores.device)


class LabelDecisions(NamedTuple):
    """The choices each label's tokens make among the labels: the branch points of the labels' token trie.

    A label's score is the sum of its tokens' log-probabilities (label tokens and eos, so no label is a prefix
    of another). At token t of label k the labels sharing k's first t tokens continue with one of a few
    tokens: where there are several, that is a decision among them. The loss is Menon et al.'s at every
    decision on the gold label's path, over that decision's candidates, each adjusted by its own prior: the
    training share of the labels under it among those sharing the prefix. Along a label's path these priors
    multiply to the label's prior, so the whole label is adjusted by tau * log prior(label), however its
    tokens are shared. Labels with distinct first tokens make one decision each, over the K first tokens: the
    loss over the K labels' first-token scores. (Scoring only the first token would make labels such as I-H
    and I-Q, whose first token is the same, one class to this loss.)

    Tensors are per label k, padded to D decisions of C candidates; a padded decision has a single candidate,
    so its cross-entropy is exactly 0.
    """

    position: Tensor   # [K, D] long: the label token each decision picks (0-based, within the label's tokens)
    tokens: Tensor     # [K, D, C] long: the candidate token ids (pads repeat the first)
    valid: Tensor      # [K, D, C] bool: real candidates
    target: Tensor     # [K, D] long: the index in tokens of label k's own token
    log_prior: Tensor  # [K, D, C] float: log share of each candidate's labels among the prefix's labels

    def to(self, device: torch.device | str) -> LabelDecisions:
        return LabelDecisions(*(t.to(device) for t in self))


def label_decisions(label_ids: Sequence[list[int]], counts: Sequence[int]) -> LabelDecisions:
    """The decisions of labels tokenized as label_ids (each ending in eos) with training rows counts."""
    if len({tuple(ids) for ids in label_ids}) != len(label_ids):
        raise ValueError(f"two labels have the same token ids: {label_ids}")
    prior = log_prior(counts).double()
    per_label = []
    for ids in label_ids:
        made = []
        for t in range(len(ids)):
            sharing = [j for j, other in enumerate(label_ids) if other[:t] == ids[:t]]
            candidates = list(dict.fromkeys(label_ids[j][t] for j in sharing))
            if len(candidates) > 1:
                node = torch.logsumexp(prior[sharing], 0)
                shares = [(torch.logsumexp(prior[[j for j in sharing if label_ids[j][t] == c]], 0) - node).item()
                          for c in candidates]
                made.append((t, candidates, candidates.index(ids[t]), shares))
        per_label.append(made)
    K, D = len(label_ids), max(map(len, per_label))
    C = max(len(c) for made in per_label for _, c, _, _ in made)
    position, target = torch.zeros(K, D, dtype=torch.long), torch.zeros(K, D, dtype=torch.long)
    tokens, valid = torch.zeros(K, D, C, dtype=torch.long), torch.zeros(K, D, C, dtype=torch.bool)
    shares_t = torch.zeros(K, D, C)
    valid[:, :, 0] = True  # a padded decision: one candidate
    for k, made in enumerate(per_label):
        for d, (t, candidates, own, shares) in enumerate(made):
            n = len(candidates)
            position[k, d], target[k, d] = t, own
            tokens[k, d] = torch.tensor(candidates + [candidates[0]] * (C - n))
            valid[k, d, :n] = True
            shares_t[k, d, :n] = torch.tensor(shares)
    return LabelDecisions(position, tokens, valid, target, shares_t)


def decision_scores(logits: Tensor, starts: Tensor, class_ids: Tensor, decisions: LabelDecisions) -> Tensor:
    """[B, D, C] logits of the candidates at each of the gold label's decisions.

    logits [N, V]: at the positions predicting the batch's target tokens, row b's from starts[b] on, in order.
    """
    rows = starts[:, None] + decisions.position[class_ids]  # [B, D]
    return logits.reshape(-1)[rows[..., None] * logits.shape[1] + decisions.tokens[class_ids]]


def logit_adjusted_loss(scores: Tensor, class_ids: Tensor, decisions: LabelDecisions, tau: float) -> Tensor:
    """Mean over rows of the logit-adjusted cross-entropy of every decision on the gold label's path.

    scores [B, D, C]: decision_scores of the batch's rows (gold labels class_ids [B]).
    """
    adjusted = scores.float() + tau * decisions.log_prior[class_ids]
    adjusted = adjusted.masked_fill(~decisions.valid[class_ids], float("-inf"))
    ce = F.cross_entropy(adjusted.flatten(0, 1), decisions.target[class_ids].flatten(), reduction="sum")
    return ce / len(class_ids)
