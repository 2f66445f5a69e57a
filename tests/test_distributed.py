"""Sharded evaluation under a real two-process gloo group: each rank's shard comes back in row order on every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from training_runs import free_port

ROWS = 7  # odd: the ranks' shards differ in size


def _rank(rank: int, world: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from ncal_core.distributed import gather_shards, shard
        full = torch.arange(ROWS * 3, dtype=torch.float32).view(ROWS, 3)
        mine = shard(ROWS, rank, world)
        out[rank] = gather_shards(full[mine], ROWS, world).tolist()
    finally:
        dist.destroy_process_group()


def test_every_rank_gets_every_row_in_order_from_the_shards():
    from ncal_core.distributed import shard
    assert sorted(shard(ROWS, 0, 2) + shard(ROWS, 1, 2)) == list(range(ROWS))
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(2, free_port(), out), nprocs=2, join=True)
        expected = torch.arange(ROWS * 3, dtype=torch.float32).view(ROWS, 3).tolist()
        assert out[0] == out[1] == expected
