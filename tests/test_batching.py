"""Padding and loss positions of a batch; length-grouped batch order: coverage, determinism, less padding."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from ncal_core.data.batching import Batch, LengthGroupedBatches, block_bounds, collate, row_weights, token_bounded
from ncal_core.data.prompts import EncodedRow
from ncal_core.data.rows import class_counts

PAD = 0


def padding(lengths: np.ndarray, batches: list[list[int]]) -> int:
    """Padding tokens when each batch is padded to its longest row."""
    return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)


def epoch(sampler: LengthGroupedBatches, number: int) -> list[list[int]]:
    """The batches the sampler yields for one epoch."""
    sampler.set_epoch(number)
    return list(sampler)


@pytest.fixture(scope="module")
def tmwpl_lengths(tmwpl_dir) -> np.ndarray:
    """A stand-in for TMWPL token lengths: characters of each question plus a fixed chat framing."""
    with open(tmwpl_dir / "TMWPL_train.jsonl", encoding="utf-8") as f:
        return np.array([len(json.loads(line)["question"]) + 20 for line in f])


def test_collate_pads_right_and_marks_exactly_the_target_positions():
    rows = [
        EncodedRow(input_ids=[5, 6, 7, 8, 9], prompt_len=3, label_index=2, example_id="a"),
        EncodedRow(input_ids=[5, 6], prompt_len=1, label_index=0, example_id="b"),
        EncodedRow(input_ids=[5, 6, 7], prompt_len=3, label_index=-1, example_id="c"),
    ]
    batch = collate(rows, pad_id=PAD)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, PAD, PAD, PAD], [5, 6, 7, PAD, PAD]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert batch.prompt_lens.tolist() == [3, 1, 3]
    assert batch.seq_lens.tolist() == [5, 2, 3]
    assert batch.class_ids.tolist() == [2, 0, -1]
    assert all(t.dtype == torch.int64 for name, t in vars(batch).items() if name != "ragged")
    positions = torch.arange(batch.input_ids.shape[1])
    target = (positions >= batch.prompt_lens[:, None]) & (positions < batch.seq_lens[:, None])
    assert [batch.input_ids[b][target[b]].tolist() for b in range(3)] == [
        row.input_ids[row.prompt_len :] for row in rows
    ]


def test_collate_target_index_points_at_the_targets_and_the_positions_before_them():
    rows = [EncodedRow([5, 6, 7, 8, 9], 3, 0, "a"), EncodedRow([5, 6], 1, 0, "b")]
    batch = collate(rows, pad_id=PAD)
    flat = batch.input_ids.reshape(-1)
    assert flat[batch.target].tolist() == [8, 9, 6]
    assert (batch.target - batch.query).tolist() == [1, 1, 1]


def _cost(lengths: list[int], bounds: list[int], block_cost: int) -> int:
    return sum(lengths[a] * (b - a) + block_cost for a, b in zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("max_blocks", [1, 2, 3, 5])
@pytest.mark.parametrize("block_cost", [0, 7, 40])
def test_block_bounds_are_the_cheapest_cut_found_by_trying_every_cut(seed, max_blocks, block_cost):
    rng = np.random.default_rng(seed)
    lengths = sorted(rng.integers(1, 50, int(rng.integers(1, 10))).tolist(), reverse=True)
    bounds = block_bounds(lengths, max_blocks, block_cost)
    assert bounds[0] == 0 and bounds[-1] == len(lengths) and bounds == sorted(set(bounds))
    assert len(bounds) - 1 <= max_blocks
    best = min(_cost(lengths, [0, *cuts, len(lengths)], block_cost)
               for k in range(min(max_blocks, len(lengths)))
               for cuts in itertools.combinations(range(1, len(lengths)), k))
    assert _cost(lengths, bounds, block_cost) == best


def test_block_bounds_do_not_cut_where_it_saves_nothing_and_refuse_unsorted_rows():
    assert block_bounds([5, 5, 5], 3, block_cost=0) == [0, 3]
    assert block_bounds([9, 5, 5, 2], 4, block_cost=0) == [0, 1, 3, 4]
    assert block_bounds([45, 45, 44, 44, 43], 4, block_cost=10) == [0, 5]  # a run costs more than the 4 it saves
    assert block_bounds([], 2, block_cost=0) == [0]
    with pytest.raises(ValueError, match="costliest-first"):
        block_bounds([1, 2], 2, block_cost=0)
    with pytest.raises(ValueError, match="at least 1"):
        block_bounds([5, 3], 0, block_cost=0)


def test_attention_blocks_hold_every_row_once_longest_first():
    rng = np.random.default_rng(0)
    rows = [EncodedRow(rng.integers(1, 9, int(n)).tolist(), 1, i % 3, str(i))
            for i, n in enumerate(rng.integers(2, 40, 32))]
    batch = collate(rows, pad_id=PAD, attention_blocks=4, block_cost=0)
    assert batch.seq_lens.tolist() == sorted(batch.seq_lens.tolist(), reverse=True)
    held = [batch.input_ids[b, : batch.seq_lens[b]].tolist() for b in range(len(rows))]
    assert sorted(held) == sorted(r.input_ids for r in rows)
    flat = batch.input_ids.reshape(-1)
    assert torch.equal(batch.ragged.batch.unpad(batch.input_ids), flat[batch.attention_mask.reshape(-1).bool()])
    assert len(batch.ragged.blocks) == 4
    start, first_row = 0, 0
    for a, b, block in batch.ragged.blocks:  # consecutive token slices; each block as wide as its longest row
        assert a == start and b - a == len(block.index)
        lens = batch.seq_lens[first_row: first_row + block.rows]
        assert block.width == int(lens.max()) and len(block.index) == int(lens.sum())
        start, first_row = b, first_row + block.rows
    assert start == int(batch.seq_lens.sum()) and first_row == len(rows)
    blocks_cost = sum(block.rows * block.width ** 2 for _, _, block in batch.ragged.blocks)
    assert blocks_cost < len(rows) * batch.input_ids.shape[1] ** 2


def test_batch_to_moves_every_tensor():
    batch = collate([EncodedRow([1, 2], 1, 0, "a")], pad_id=PAD).to("meta")
    assert isinstance(batch, Batch)
    tensors = [t for name, t in vars(batch).items() if name != "ragged"]
    tensors += [batch.ragged.batch.index, *(block.index for _, _, block in batch.ragged.blocks)]
    assert {t.device.type for t in tensors} == {"meta"}


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize(("n", "batch_size"), [(1, 4), (7, 3), (401, 8), (1000, 5)])
def test_every_row_exactly_once_per_epoch(n, batch_size, shuffle):
    lengths = list(np.random.default_rng(n).integers(1, 300, n))
    sampler = LengthGroupedBatches(lengths, batch_size, seed=3, shuffle=shuffle)
    for number in range(2):
        batches = epoch(sampler, number)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert sum(len(b) < batch_size for b in batches) <= 1


def test_drop_last_yields_only_full_batches():
    sampler = LengthGroupedBatches(list(range(1, 1004)), 10, drop_last=True)
    batches = epoch(sampler, 0)
    assert len(batches) == len(sampler) == 100
    assert all(len(b) == 10 for b in batches)
    assert len({i for b in batches for i in b}) == 1000


def test_order_is_determined_by_seed_and_epoch(tmwpl_lengths):
    lengths = list(tmwpl_lengths)
    a, b = LengthGroupedBatches(lengths, 16, seed=1), LengthGroupedBatches(lengths, 16, seed=1)
    assert epoch(a, 0) == epoch(b, 0)
    assert epoch(a, 3) == epoch(b, 3)
    assert epoch(a, 0) != epoch(a, 1)
    assert epoch(a, 0) != epoch(LengthGroupedBatches(lengths, 16, seed=2), 0)


def test_grouping_pads_far_less_than_random_batches(tmwpl_lengths):
    sampler = LengthGroupedBatches(list(tmwpl_lengths), 16, seed=0)
    grouped = padding(tmwpl_lengths, epoch(sampler, 0))
    order = np.random.default_rng(0).permutation(len(tmwpl_lengths))
    random = padding(tmwpl_lengths, [order[i : i + 16] for i in range(0, len(order), 16)])
    assert grouped < 0.25 * random, (grouped, random)


def test_longest_row_comes_in_the_first_batch():
    lengths = [*np.random.default_rng(0).integers(1, 100, 500).tolist(), 1000]
    for number in range(3):
        assert 500 in epoch(LengthGroupedBatches(lengths, 8, seed=number), number)[0]


def test_evaluation_order_is_sorted_by_length_without_shuffling():
    lengths = [3, 9, 1, 9, 5, 2, 7]
    batches = epoch(LengthGroupedBatches(lengths, 3, shuffle=False), 5)
    assert batches == [[1, 3, 6], [4, 0, 5], [2]]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_token_bounded_runs_are_consecutive_within_budget_and_each_as_long_as_it_can_be(padded, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, 40).tolist()
    index = rng.permutation(40).tolist()
    budget = 100

    def cost(run):
        return len(run) * max(lengths[i] for i in run) if padded else sum(lengths[i] for i in run)

    runs = token_bounded(index, lengths, budget, padded=padded)
    assert [i for run in runs for i in run] == index
    assert all(cost(run) <= budget or len(run) == 1 for run in runs)
    assert all(cost(run + nxt[:1]) > budget for run, nxt in zip(runs, runs[1:]))


def test_token_bounded_counts_padding_only_when_padded():
    assert token_bounded([0, 1], [1, 5], 6) == [[0, 1]]
    assert token_bounded([0, 1], [1, 5], 6, padded=True) == [[0], [1]]
    assert token_bounded([0, 1, 2], [1, 9, 1], 6) == [[0], [1], [2]]  # a row over the budget goes alone
    assert token_bounded([], [], 6) == []


def test_balanced_resampling_draws_classes_about_equally():
    class_ids = [0] * 900 + [1] * 90 + [2] * 10
    sampler = LengthGroupedBatches([10] * 1000, 50, seed=1, weights=row_weights(class_ids, 3, "balanced"))
    drawn = [class_ids[i] for i in itertools.chain.from_iterable(sampler)]
    shares = torch.tensor(class_counts(drawn, 3), dtype=torch.float) / len(drawn)
    assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=0.05)
    sqrt_w = row_weights(class_ids, 3, "sqrt")
    assert sqrt_w[0] == pytest.approx(1 / 30) and sqrt_w[-1] == pytest.approx(1 / 10 ** 0.5)
    assert row_weights(class_ids, 3, "none") is None


def test_resampling_can_wait_for_the_last_epochs():
    class_ids = [0] * 95 + [1] * 5
    sampler = LengthGroupedBatches([10] * 100, 10, seed=0, weights=row_weights(class_ids, 2, "balanced"),
                                   weighted_from_epoch=2)
    sampler.set_epoch(1)
    assert sorted(itertools.chain.from_iterable(sampler)) == list(range(100))  # a plain permutation
    sampler.set_epoch(2)
    assert sum(class_ids[i] for i in itertools.chain.from_iterable(sampler)) > 25
