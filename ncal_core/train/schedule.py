"""AdamW and the warm-up + linear/cosine learning-rate schedule of the loop."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable weights; biases and norm weights (1-D) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    # the fused kernel is one launch per step on CUDA; on CPU the optimizer is under 1% of a step either way
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=True)


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warm-up over `warmup_steps`, then linear or cosine decay to 0 at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return LambdaLR(optimizer, factor)


def set_peak_lr(scheduler: LambdaLR, lr: float) -> None:
    """Give a restored schedule another peak learning rate from the step it is at (a resumed run's new
    --learning_rate)."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
