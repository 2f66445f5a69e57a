"""All-gather of TC features with their gradient, so the TC loss sees the global batch under DDP."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _GatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's [b, H] rows. Backward: sum the incoming gradients over ranks.

    Every rank computes the same loss on the gathered batch, so the summed gradient of a rank's own
    rows is world_size times the true one; DDP's averaging over ranks divides that back out.
    """

    @staticmethod
    def forward(ctx, local: Tensor) -> Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), local.shape[0]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_features(z: Tensor, class_ids: Tensor) -> tuple[Tensor, Tensor]:
    """z [b, H] and class_ids [b] of this rank -> the global batch's [b * world, H] and [b * world].

    Ranks must hold the same number of rows (the sampler gives every rank an equal slice).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, class_ids
    ids = [torch.empty_like(class_ids) for _ in range(dist.get_world_size())]
    dist.all_gather(ids, class_ids.contiguous())
    return _GatherWithGrad.apply(z), torch.cat(ids)


def shard(n: int, rank: int, world: int) -> list[int]:
    """The row indices one rank scores out of n: every world-th row from its rank (lengths stay mixed)."""
    return list(range(rank, n, world))


def gather_shards(local: Tensor, n: int, world: int) -> Tensor:
    """Every rank's [rows of `shard(n, r, world)`, ...] CPU tensor -> the [n, ...] tensor in row order, on all ranks."""
    if world == 1:
        return local
    parts: list[Tensor | None] = [None] * world
    dist.all_gather_object(parts, local.cpu())
    out = torch.empty(n, *local.shape[1:], dtype=local.dtype)
    for rank, part in enumerate(parts):
        out[rank::world] = part
    return out
