"""Encoded rows -> right-padded batches (with the layout that lets the model skip their padding), and samplers
(with the re-sampling weights of the long-tail remedies)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from ncal_core.data.prompts import EncodedRow
from ncal_core.data.rows import class_counts
from ncal_core.layout import Padding, Ragged

MEGABATCH_BATCHES = 50
RESAMPLING = ("none", "balanced", "sqrt")
ATTENTION_BLOCKS = 4  # at most this many attention blocks per training micro-batch
# What one more attention block costs, in units of one row's attention over one squared token: a block is cut
# off only where the padding it saves costs more. (Measured on the built-in tiny model on CPU.)
BLOCK_COST = 8192
# Tokens a forward of the evaluation passes (TC features, label scoring) takes at most, padding included where
# the pass pads: the MLP's temporaries of a forward are ~3 * I fp32 values a token (at Qwen2.5-0.5B's shapes
# 57 KB), so 1,024 tokens keep them near a training step's, where 32 long rows took 310 MB more.
EVAL_TOKENS = 1024


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
    ragged: Ragged  # where the real tokens are, and the rows' attention blocks

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor on device."""
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) if f.name != "ragged"
                        else self.ragged.to(device) for f in fields(self)})


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


def collate(rows: list[EncodedRow], pad_id: int, attention_blocks: int = 1, block_cost: int = BLOCK_COST) -> Batch:
    """Pad rows on the right to the longest one.

    With attention_blocks > 1 the rows are sorted longest-first and cut into up to that many blocks of similar
    length, each padded only to its own longest row when the model attends (layout.Ragged); where to cut is the
    cheapest split (block_bounds) of the rows' squared lengths, attention's cost, plus block_cost per block.
    """
    if attention_blocks > 1:
        rows = sorted(rows, key=lambda row: -len(row.input_ids))
    seq_lens = torch.tensor([len(row.input_ids) for row in rows], dtype=torch.int64)
    width = int(seq_lens.max())
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    for b, row in enumerate(rows):
        input_ids[b, : len(row.input_ids)] = torch.tensor(row.input_ids, dtype=torch.int64)
    positions = torch.arange(width)
    attention_mask = positions[None, :] < seq_lens[:, None]
    prompt_lens = torch.tensor([row.prompt_len for row in rows], dtype=torch.int64)
    query, target = target_index(prompt_lens, seq_lens, width)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask.to(torch.int64),
        prompt_lens=prompt_lens,
        seq_lens=seq_lens,
        class_ids=torch.tensor([row.label_index for row in rows], dtype=torch.int64),
        query=query,
        target=target,
        ragged=ragged_layout(seq_lens.tolist(), width, attention_blocks, block_cost),
    )


def token_bounded(index: Sequence[int], lengths: Sequence[int], budget: int, *, padded: bool = False
                  ) -> list[list[int]]:
    """The rows of index, kept in order, in runs of consecutive rows of at most `budget` tokens (a longer row
    alone): their lengths' sum, or with `padded` their number times the longest, as a padded batch holds."""
    parts: list[list[int]] = []
    longest = total = 0  # of the last run
    for i in index:
        n = lengths[i]
        if parts and ((len(parts[-1]) + 1) * max(longest, n) if padded else total + n) <= budget:
            parts[-1].append(i)
            longest, total = max(longest, n), total + n
        else:
            parts.append([i])
            longest = total = n
    return parts


def ragged_layout(seq_lens: list[int], width: int, max_blocks: int, block_cost: int) -> Ragged:
    """The Ragged of right-padded rows of these lengths (longest-first when max_blocks > 1)."""
    def padding(lens: list[int], w: int) -> Padding:
        flat = [torch.arange(n) + b * w for b, n in enumerate(lens)]
        return Padding(torch.cat(flat) if flat else torch.zeros(0, dtype=torch.int64), len(lens), w)

    bounds = block_bounds([n * n for n in seq_lens], max_blocks, block_cost) if max_blocks > 1 else \
        [0, len(seq_lens)]
    offsets = np.concatenate([[0], np.cumsum(seq_lens)]).astype(int).tolist()
    blocks = tuple((offsets[a], offsets[b], padding(seq_lens[a:b], max(seq_lens[a:b])))
                   for a, b in zip(bounds[:-1], bounds[1:]) if b > a)
    return Ragged(padding(seq_lens, width), blocks)


def block_bounds(costs: Sequence[int], max_blocks: int, block_cost: int) -> list[int]:
    """Where to cut rows sorted costliest-first into at most max_blocks blocks, at the least cost.

    Returns each block's first row and, last, len(costs). In a block starting at row i every row costs costs[i]
    (rows are padded to the block's first), plus block_cost for the block itself; an exact dynamic programme
    over the cut points.
    """
    n = len(costs)
    length = np.asarray(costs, dtype=np.float64)
    if max_blocks < 1:
        raise ValueError(f"max_blocks must be at least 1, got {max_blocks}")
    if np.any(np.diff(length) > 0):
        raise ValueError("rows must be sorted costliest-first")
    if n == 0:
        return [0]
    cost = np.full(n + 1, np.inf)  # cost[j]: least cost of the first j rows in k blocks
    cost[0] = 0.0
    starts, totals = [], []  # starts[k][j]: first row of the last block in the best split of j rows into k+1 blocks
    for _ in range(min(max_blocks, n)):
        new, start = np.full(n + 1, np.inf), np.zeros(n + 1, dtype=np.int64)
        for j in range(1, n + 1):
            total = cost[:j] + length[:j] * (j - np.arange(j)) + block_cost
            start[j] = int(np.argmin(total))
            new[j] = total[start[j]]
        cost = new
        starts.append(start)
        totals.append(cost[n])
    bounds = [n]
    for start in reversed(starts[: int(np.argmin(totals)) + 1]):  # the fewest blocks among the cheapest
        bounds.insert(0, int(start[bounds[0]]))
    return bounds


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


def row_weights(class_ids: Sequence[int], num_classes: int, mode: str) -> list[float] | None:
    """Sampling weight per row: balanced = 1/n_c (every class equally often), sqrt = 1/sqrt(n_c); none -> None."""
    if mode not in RESAMPLING:
        raise ValueError(f"resampling must be one of {', '.join(RESAMPLING)}, not {mode!r}")  # TrainConfig.check'd
    if mode == "none":
        return None
    counts = class_counts(class_ids, num_classes)
    power = 1.0 if mode == "balanced" else 0.5
    return [1.0 / counts[c] ** power for c in class_ids]
