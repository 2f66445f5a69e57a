"""Encoded rows -> padded batches, and batch samplers that group rows of similar length."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from ncal_core.prompts import EncodedRow

MEGABATCH_BATCHES = 50


@dataclass
class Batch:
    """A right-padded batch of encoded rows."""

    input_ids: Tensor  # [B, T] int64, right-padded with pad_id
    attention_mask: Tensor  # [B, T] int64, 1 = real token
    prompt_lens: Tensor  # [B] int64: targets are input_ids[b, prompt_lens[b]:seq_lens[b]]
    seq_lens: Tensor  # [B] int64
    class_ids: Tensor  # [B] int64, -1 for unlabeled rows

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor on device."""
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


def collate(rows: list[EncodedRow], pad_id: int) -> Batch:
    """Pad rows on the right to the longest one."""
    seq_lens = torch.tensor([len(row.input_ids) for row in rows], dtype=torch.int64)
    input_ids = torch.full((len(rows), int(seq_lens.max())), pad_id, dtype=torch.int64)
    for b, row in enumerate(rows):
        input_ids[b, : len(row.input_ids)] = torch.tensor(row.input_ids, dtype=torch.int64)
    positions = torch.arange(input_ids.shape[1])
    return Batch(
        input_ids=input_ids,
        attention_mask=(positions[None, :] < seq_lens[:, None]).to(torch.int64),
        prompt_lens=torch.tensor([row.prompt_len for row in rows], dtype=torch.int64),
        seq_lens=seq_lens,
        class_ids=torch.tensor([row.label_index for row in rows], dtype=torch.int64),
    )


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
