"""Where a batch's real tokens sit: the layouts the data side builds and the decoder runs on."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Padding(NamedTuple):
    """Where the real tokens of a right-padded [rows, width] batch sit."""

    index: Tensor  # [N] flat indices into [rows * width] of the real tokens, ascending
    rows: int
    width: int

    def pad(self, x: Tensor) -> Tensor:
        """[N, ...] -> [rows, width, ...], zeros at the pads."""
        out = x.new_zeros(self.rows * self.width, *x.shape[1:])
        return out.index_copy(0, self.index, x).view(self.rows, self.width, *x.shape[1:])

    def unpad(self, x: Tensor) -> Tensor:
        """[rows, width, ...] -> [N, ...]"""
        return x.reshape(self.rows * self.width, *x.shape[2:]).index_select(0, self.index)

    def to(self, device: torch.device | str) -> Padding:
        return self._replace(index=self.index.to(device, non_blocking=True))


class Ragged(NamedTuple):
    """A right-padded batch run without its padding.

    The layers' matmuls and norms take its N real tokens, in row order. Attention takes them in blocks of
    consecutive rows, each block padded only to its own longest row: right padding needs no mask there (a real
    token never attends to the pads after it), so every block runs SDPA's causal path.
    """

    batch: Padding  # the whole batch: where its input ids come from and its hidden states go
    blocks: tuple[tuple[int, int, Padding], ...]  # per block: its tokens' slice [start, stop) of the N, its layout

    def to(self, device: torch.device | str) -> Ragged:
        return Ragged(self.batch.to(device), tuple((a, b, p.to(device)) for a, b, p in self.blocks))
