"""One optimizer step of the training loop: micro-batches, TC over the gathered batch, the update.

Everything a step makes stays on the training device: the step record holds device tensors for what
the device computed (LM and TC sums) and host numbers for what the host already knows (tokens, rows),
so no step waits for the device. Only `host_values`, called at log steps, reads the device.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from ncal_core.data.batching import ATTENTION_BLOCKS, collate
from ncal_core.data.prompts import EncodedRow
from ncal_core.distributed import gather_features
from ncal_core.loss.longtail import etf_target_loss, logit_adjusted_loss
from ncal_core.loss.objective import TrainingObjective
from ncal_core.loss.tc import etf_gram_loss
from ncal_core.train.config import TrainConfig


@dataclass
class StepRecord:
    """What one rank's optimizer steps add up to since the last log line."""

    lm_sum: Tensor          # device scalar: summed LM cross-entropy over this rank's target tokens
    tc_sum: Tensor          # device scalar: TC loss summed over micro-batches, divided by the world size
    tokens: int = 0         # this rank's target tokens
    micro_batches: int = 0  # this rank's micro-batches
    rows: int = 0           # this rank's rows

    @classmethod
    def zero(cls, device: torch.device) -> StepRecord:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device))

    def __add__(self, other: StepRecord) -> StepRecord:
        return StepRecord(self.lm_sum + other.lm_sum, self.tc_sum + other.tc_sum, self.tokens + other.tokens,
                          self.micro_batches + other.micro_batches, self.rows + other.rows)

    def packed(self) -> Tensor:
        """[5] on the device of the sums, for one reduction over ranks: LM, tokens, TC, micro-batches, rows."""
        tokens, micro_batches, rows = torch.tensor([self.tokens, self.micro_batches, self.rows], dtype=torch.float32,
                                                   device=self.lm_sum.device)
        return torch.stack([self.lm_sum.float(), tokens, self.tc_sum.float(), micro_batches, rows])


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
    num_classes: int
    prior_log: Tensor              # [K] log training prior, on the device
    etf_targets: Tensor | None     # [K, H] fixed class directions of --tc_variant etf_target
    device: torch.device
    tc_backend: str = "torch"      # resolved by ncal.resolve_backend: triton or torch
    world: int = 1
    rank: int = 0


def _micro_batch_loss(parts: StepParts, batch: Any, n_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """(loss to back-propagate, LM sum, TC loss) of one micro-batch already on the device."""
    cfg, accum = parts.cfg, parts.cfg.gradient_accumulation_steps
    lm_sum, z, first_scores, class_ids = parts.objective(batch)
    # DDP averages gradients over ranks: scale so the step's gradient is that of the mean over every
    # target token of the global accumulated batch
    loss = lm_sum * (parts.world / n_tokens)
    tc = torch.zeros((), device=lm_sum.device)
    if z is not None:
        z_all, y_all = gather_features(z, class_ids)
        tc = etf_target_loss(z_all, y_all, parts.etf_targets) if parts.etf_targets is not None else \
            etf_gram_loss(z_all, y_all, parts.num_classes, e_w=cfg.e_w, class_diff=cfg.class_diff,
                          backend=parts.tc_backend, async_checks=True)
        loss = loss + cfg.lambda_lc * tc / accum
    if first_scores is not None:
        loss = loss + logit_adjusted_loss(first_scores, class_ids, parts.prior_log, cfg.la_loss_tau) / accum
    return loss, lm_sum, tc


def train_step(parts: StepParts, group: list[list[int]], since_log: StepRecord) -> StepRecord:
    """Forward and backward over a group of global micro-batches (this rank's slice of each), then the update.

    `group` holds gradient_accumulation_steps lists of row indices into `parts.encoded`, each the global batch.
    Returns `since_log` with this step's micro-batches added one by one (the sums' rounding does not depend on
    how steps fall between log lines).
    """
    cfg, acc, encoded = parts.cfg, parts.accelerator, parts.encoded
    per_rank = cfg.per_device_train_batch_size
    n_tokens = sum(len(encoded[i].input_ids) - encoded[i].prompt_len for rows in group for i in rows)
    record = since_log
    for k, rows in enumerate(group):
        mine = rows[parts.rank * per_rank:(parts.rank + 1) * per_rank]
        batch = collate([encoded[i] for i in mine], parts.pad_id,
                        ATTENTION_BLOCKS if cfg.padding_free else 1).to(parts.device)
        sync = k == len(group) - 1
        with (nullcontext() if sync else acc.no_sync(parts.objective)), acc.autocast():
            loss, lm_sum, tc = _micro_batch_loss(parts, batch, n_tokens)
        acc.backward(loss)
        record = record + StepRecord(lm_sum.detach().float(), tc.detach().float() / parts.world,
                                     len(batch.target), 1, len(mine))
    if cfg.max_grad_norm > 0:
        acc.clip_grad_norm_(parts.objective.parameters(), cfg.max_grad_norm)
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    return record
