"""Encoded rows -> padded batches (whole, or cut into chunks of similar length), and batch samplers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from ncal_core.prompts import EncodedRow

MEGABATCH_BATCHES = 50
# What one more pass through the model costs, in padded tokens: a chunk is cut off only where it saves more.
# (Measured on the built-in tiny model on CPU, where a pass's fixed cost is about 100 tokens' work.)
CHUNK_COST_TOKENS = 96


@dataclass
class Batch:
    """A right-padded batch of encoded rows."""

    input_ids: Tensor  # [B, T] int64, right-padded with pad_id
    attention_mask: Tensor  # [B, T] int64, 1 = real token
    prompt_lens: Tensor  # [B] int64: targets are input_ids[b, prompt_lens[b]:seq_lens[b]]
    seq_lens: Tensor  # [B] int64
    class_ids: Tensor  # [B] int64, -1 for unlabeled rows
    query: Tensor  # [N] int64: flat indices into [B * T] of the positions that predict a target token
    target: Tensor  # [N] int64: flat indices of those target tokens

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor on device."""
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


def target_index(prompt_lens: Tensor, seq_lens: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Flat indices into [B * T] of the positions that predict a target token, and of those tokens.

    Row b's targets are tokens prompt_len .. seq_len-1, predicted from the position before each.
    Computed on the host when the batch is built, so the hot path has no data-dependent sync.
    """
    query, target = [], []
    for b, (p, s) in enumerate(zip(prompt_lens.tolist(), seq_lens.tolist())):
        query.append(torch.arange(p - 1, s - 1) + b * width)
        target.append(torch.arange(p, s) + b * width)
    return torch.cat(query), torch.cat(target)


def collate(rows: list[EncodedRow], pad_id: int) -> Batch:
    """Pad rows on the right to the longest one."""
    seq_lens = torch.tensor([len(row.input_ids) for row in rows], dtype=torch.int64)
    input_ids = torch.full((len(rows), int(seq_lens.max())), pad_id, dtype=torch.int64)
    for b, row in enumerate(rows):
        input_ids[b, : len(row.input_ids)] = torch.tensor(row.input_ids, dtype=torch.int64)
    positions = torch.arange(input_ids.shape[1])
    prompt_lens = torch.tensor([row.prompt_len for row in rows], dtype=torch.int64)
    query, target = target_index(prompt_lens, seq_lens, input_ids.shape[1])
    return Batch(
        input_ids=input_ids,
        attention_mask=(positions[None, :] < seq_lens[:, None]).to(torch.int64),
        prompt_lens=prompt_lens,
        seq_lens=seq_lens,
        class_ids=torch.tensor([row.label_index for row in rows], dtype=torch.int64),
        query=query,
        target=target,
    )


def chunk_bounds(lengths: Sequence[int], max_chunks: int, chunk_cost: int = CHUNK_COST_TOKENS) -> list[int]:
    """Where to cut rows sorted longest-first into at most max_chunks runs, at the least cost.

    Returns each run's first row and, last, len(lengths). A run starting at row i is padded to lengths[i],
    so it costs lengths[i] tokens per row, plus chunk_cost tokens for the extra pass through the model;
    an exact dynamic programme over the cut points.
    """
    n = len(lengths)
    length = np.asarray(lengths, dtype=np.float64)
    if max_chunks < 1:
        raise ValueError(f"max_chunks must be at least 1, got {max_chunks}")
    if np.any(np.diff(length) > 0):
        raise ValueError("rows must be sorted longest-first")
    if n == 0:
        return [0]
    cost = np.full(n + 1, np.inf)  # cost[j]: least cost of the first j rows in k runs
    cost[0] = 0.0
    starts, totals = [], []  # starts[k][j]: first row of the last run in the best split of j rows into k+1 runs
    for _ in range(min(max_chunks, n)):
        new, start = np.full(n + 1, np.inf), np.zeros(n + 1, dtype=np.int64)
        for j in range(1, n + 1):
            total = cost[:j] + length[:j] * (j - np.arange(j)) + chunk_cost
            start[j] = int(np.argmin(total))
            new[j] = total[start[j]]
        cost = new
        starts.append(start)
        totals.append(cost[n])
    bounds = [n]
    for start in reversed(starts[: int(np.argmin(totals)) + 1]):  # the fewest runs among the cheapest
        bounds.insert(0, int(start[bounds[0]]))
    return bounds


def collate_chunks(rows: list[EncodedRow], pad_id: int, max_chunks: int,
                   chunk_cost: int = CHUNK_COST_TOKENS) -> list[Batch]:
    """The rows, longest first, as up to max_chunks right-padded batches of similar length.

    Run one after another through the decoder, they give the outputs of one batch padded to the longest
    row (up to rounding: the matrix shapes differ) with fewer padded tokens.
    """
    rows = sorted(rows, key=lambda row: -len(row.input_ids))
    bounds = chunk_bounds([len(row.input_ids) for row in rows], max_chunks, chunk_cost)
    return [collate(rows[a:b], pad_id) for a, b in zip(bounds[:-1], bounds[1:])]


class LengthGroupedBatches:
    """Batches of row indices with similar lengths, so little of each batch is padding.

    Shuffled: each epoch the rows are permuted, cut into megabatches of MEGABATCH_BATCHES batches, each megabatch
    is sorted by length and split into batches, and the batch order is shuffled, with the batch holding the longest
    row put first so that running out of memory shows at the first step. Deterministic given (seed, epoch).
    Not shuffled: rows sorted by length (longest first) and cut into batches, for evaluation.
    `megabatch_batches=1` gives plain random batches (no grouping by length).
    With `weights` (one per row), epochs from `weighted_from_epoch` on draw as many rows as there are,
    with replacement and probability proportional to the weights (class re-sampling), instead of a permutation.
    """

    def __init__(
        self, lengths: list[int], batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
        weights: Sequence[float] | None = None, weighted_from_epoch: int = 0,
        megabatch_batches: int = MEGABATCH_BATCHES,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if weights is not None and len(weights) != len(lengths):
            raise ValueError(f"{len(weights)} weights for {len(lengths)} rows")
        self.probabilities = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.weighted_from_epoch = weighted_from_epoch
        self.megabatch_batches = megabatch_batches
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Number of batches per epoch."""
        whole, rest = divmod(len(self.lengths), self.batch_size)
        return whole if self.drop_last or rest == 0 else whole + 1

    def _split(self, order: np.ndarray) -> list[list[int]]:
        """Consecutive batches of the given row order."""
        return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]

    def _batches(self) -> list[list[int]]:
        """This epoch's batches, the short last one included."""
        # A stable sort on the negated lengths keeps equal-length rows in their given order.
        if not self.shuffle:
            return self._split(np.argsort(-self.lengths, kind="stable"))
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.probabilities is not None and self.epoch >= self.weighted_from_epoch:
            order = rng.choice(len(self.lengths), size=len(self.lengths), replace=True, p=self.probabilities)
        else:
            order = rng.permutation(len(self.lengths))
        mega = self.batch_size * self.megabatch_batches
        # Megabatches are whole multiples of batch_size, so only the very last batch can be short.
        batches = []
        for start in range(0, len(order), mega):
            chunk = order[start : start + mega]
            batches += self._split(chunk[np.argsort(-self.lengths[chunk], kind="stable")])
        batches = [batches[i] for i in rng.permutation(len(batches))]
        if batches:
            longest = max(range(len(batches)), key=lambda i: self.lengths[batches[i]].max())
            batches[0], batches[longest] = batches[longest], batches[0]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        """The row indices of each batch of the current epoch."""
        batches = self._batches()
        if self.drop_last:
            batches = [batch for batch in batches if len(batch) == self.batch_size]
        return iter(batches)
