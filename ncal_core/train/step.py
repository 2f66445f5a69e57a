"""One optimizer step of the training loop: micro-batches, TC over the gathered batch, the update.

Everything a step makes stays on the training device: the step record holds device tensors for what
the device computed (LM and TC sums) and host numbers for what the host already knows (tokens, rows),
so no step waits for the device. Only `host_values`, called at log steps, reads the device.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from ncal_core.data.batching import ATTENTION_BLOCKS, Batch, collate
from ncal_core.data.prompts import EncodedRow
from ncal_core.distributed import gather_features
from ncal_core.loss.logit_adjustment import LabelDecisions, logit_adjusted_loss
from ncal_core.loss.objective import TrainingObjective
from ncal_core.loss.tc import TCConfig, tc_batch_loss
from ncal_core.train import fsdp
from ncal_core.train.config import TrainConfig


@dataclass
class StepRecord:
    """What one rank's optimizer steps add up to since the last log line."""

    lm_sum: Tensor          # device scalar: summed LM cross-entropy over this rank's target tokens
    tc_sum: Tensor          # device scalar: TC loss summed over micro-batches, divided by the world size
    targets: int = 0        # this rank's target tokens (what the LM sum is a sum over)
    micro_batches: int = 0  # this rank's micro-batches
    rows: int = 0           # this rank's rows
    tokens: int = 0         # their real tokens, prompt and label
    sq_tokens: int = 0      # the sum of their squared lengths (causal attention's work grows with it)
    padded: int = 0         # tokens the layers' matmuls ran on: the real ones padding-free, else rows x width
    attended: int = 0       # attention's rows x squared widths as it ran (per block padding-free)

    SUMMED = ("targets", "micro_batches", "rows", "tokens", "sq_tokens", "padded", "attended")

    @classmethod
    def zero(cls, device: torch.device) -> StepRecord:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device))

    def __add__(self, other: StepRecord) -> StepRecord:
        counts = {name: getattr(self, name) + getattr(other, name) for name in self.SUMMED}
        return StepRecord(self.lm_sum + other.lm_sum, self.tc_sum + other.tc_sum, **counts)

    def packed(self) -> Tensor:
        """[2 + len(SUMMED)] on the device of the sums, for one sum over ranks: LM, TC, then the counts."""
        counts = torch.tensor([getattr(self, name) for name in self.SUMMED], dtype=torch.float64,
                              device=self.lm_sum.device)
        return torch.cat([torch.stack([self.lm_sum.double(), self.tc_sum.double()]), counts])


def _micro_record(lm_sum: Tensor, tc: Tensor, batch: Batch, lengths: list[int], targets: int,
                  padding_free: bool, world: int) -> StepRecord:
    """One micro-batch's record: the device's two sums, and what the host knows of its rows."""
    rows, width = len(lengths), max(lengths)
    attended = sum(p.rows * p.width ** 2 for _, _, p in batch.ragged.blocks) if padding_free else rows * width ** 2
    return StepRecord(lm_sum.detach().float(), tc.detach().float() / world, targets, 1, rows, sum(lengths),
                      sum(n * n for n in lengths), sum(lengths) if padding_free else rows * width, attended)


def host_values(tensor: Tensor) -> list[float]:
    """The one place a log step waits for the device (a test stubs it to run steps on the meta device)."""
    return tensor.tolist()


@dataclass
class StepParts:
    """What `train_step` needs, made once by the loop's setup."""

    accelerator: Accelerator
    objective: TrainingObjective  # possibly wrapped by accelerator.prepare (DDP)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    encoded: list[EncodedRow]
    pad_id: int
    cfg: TrainConfig
    prior_log: Tensor              # [K] log training prior, on the device
    etf_targets: Tensor | None     # [K, H] fixed class directions of --tc_variant etf_target
    tc: TCConfig | None            # None without the TC loss; its backend resolved: triton or torch
    decisions: LabelDecisions | None  # the labels' token decisions, with --la_loss_tau (on the device)

    @property
    def num_classes(self) -> int:
        return self.prior_log.shape[0]

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index


def row_targets(row: EncodedRow) -> int:
    """What a row's loss sums over: its label tokens and eos, or (a head run's prompt-only row) its one class."""
    return max(1, len(row.input_ids) - row.prompt_len)


def _micro_batch_loss(parts: StepParts, batch: Any, n_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """(loss to back-propagate, LM sum, TC loss) of one micro-batch already on the device."""
    cfg, accum = parts.cfg, parts.cfg.gradient_accumulation_steps
    lm_sum, z, decision_scores, class_ids = parts.objective(batch)
    # DDP averages gradients over ranks: scale so the step's gradient is that of the mean over every
    # target token of the global accumulated batch
    loss = lm_sum * (parts.world / n_tokens)
    tc = torch.zeros((), device=lm_sum.device)
    if z is not None:
        z_all, y_all = gather_features(z, class_ids)
        tc = tc_batch_loss(z_all, y_all, parts.num_classes, parts.tc, parts.etf_targets, async_checks=True)
        loss = loss + parts.tc.weight * tc / accum
    if decision_scores is not None:
        loss = loss + logit_adjusted_loss(decision_scores, class_ids, parts.decisions, cfg.la_loss_tau) / accum
    return loss, lm_sum, tc


def _gradient_sync(parts: StepParts, sync: bool) -> AbstractContextManager:
    """Gradients reduced over ranks at the step's last micro-batch only (DDP's no_sync; FSDP2's flag)."""
    if fsdp.is_sharded(parts.objective):
        fsdp.set_gradient_sync(parts.objective, sync)
        return nullcontext()
    return nullcontext() if sync else parts.accelerator.no_sync(parts.objective)


def train_step(parts: StepParts, group: list[list[int]], since_log: StepRecord) -> StepRecord:
    """Forward and backward over a group of global micro-batches (this rank's slice of each), then the update.

    `group` holds gradient_accumulation_steps lists of row indices into `parts.encoded`, each the global batch.
    Returns `since_log` with this step's micro-batches added one by one (the sums' rounding does not depend on
    how steps fall between log lines).
    """
    cfg, acc, encoded = parts.cfg, parts.accelerator, parts.encoded
    per_rank = cfg.per_device_train_batch_size
    n_tokens = sum(row_targets(encoded[i]) for rows in group for i in rows)
    record = since_log
    for k, rows in enumerate(group):
        mine = rows[parts.rank * per_rank:(parts.rank + 1) * per_rank]
        host_batch = collate([encoded[i] for i in mine], parts.pad_id, ATTENTION_BLOCKS if cfg.padding_free else 1)
        batch = host_batch.to(parts.device)
        sync = k == len(group) - 1
        with _gradient_sync(parts, sync), acc.autocast():
            loss, lm_sum, tc = _micro_batch_loss(parts, batch, n_tokens)
        acc.backward(loss)
        record = record + _micro_record(lm_sum, tc, host_batch, [len(encoded[i].input_ids) for i in mine],
                                        sum(row_targets(encoded[i]) for i in mine), cfg.padding_free, parts.world)
    if cfg.max_grad_norm > 0:
        acc.clip_grad_norm_(parts.objective.parameters(), cfg.max_grad_norm)
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    return record
