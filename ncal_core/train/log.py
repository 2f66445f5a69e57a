"""Log steps: the step records of every rank -> one line of metrics.jsonl and the progress bar's figures.

Each line carries the losses and the work behind them (rows, tokens, the attention it ran), with the rates
they give: samples/s, tokens/s, the model FLOP/s of forward + backward, and MFU where the device's peak is
known. Benchmarks read these lines rather than re-deriving a run's batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ncal_core.model.qwen import QwenModel
from ncal_core.train.state import TrainState
from ncal_core.train.step import StepRecord

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, by a substring of torch.cuda.get_device_name().
# The H100 PCIe / NVL parts are slower than the SXM one (989) and are left out, so they read as unknown.
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H200": 989.0, "A100": 312.0}
# the fields of a step line that depend on the wall clock (all else is the same in every run of the same flags)
TIMED = ("seconds", "samples_per_s", "tokens_per_s", "model_tflops_per_s", "mfu")


def peak_bf16_tflops(device_name: str) -> float | None:
    """The GPU's dense bf16 peak from PEAK_BF16_TFLOPS, or None when the name is not in the table."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in device_name), None)


@dataclass(frozen=True)
class FlopModel:
    """Model FLOPs of one forward + backward, as MFU counts them: 2 per multiply-add of the forward; the backward
    2 more for each matmul's input gradient and 2 more for each trainable weight's; no recomputation, no pads."""

    per_token: float          # the decoder's linear layers (LoRA's included), at every real token
    per_squared_token: float  # attention's QK^T and AV, per squared row length
    per_target: float         # the label-only head, at the target positions only

    @classmethod
    def of(cls, model: QwenModel) -> FlopModel:
        c = model.config
        per_token = sum((6 if p.requires_grad else 4) * p.numel() for p in model.layers.parameters() if p.dim() == 2)
        head = model.lm_head.weight if model.lm_head is not None else None  # a classifier's K-way head: negligible
        return cls(per_token, 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim,
                   0 if head is None else (6 if head.requires_grad else 4) * head.numel())

    def __call__(self, tokens: float, sq_tokens: float, targets: float) -> float:
        return self.per_token * tokens + self.per_squared_token * sq_tokens + self.per_target * targets


class MetricsLog:
    """metrics.jsonl, written by the main process (every rank counts the lines: a resume truncates to the count),
    and the same figures to the experiment trackers: a step's under train/, an evaluation's under its split."""

    def __init__(self, path: Path, state: TrainState, write: bool, trackers: Accelerator | None = None) -> None:
        self.path, self.state, self.write, self.trackers = path, state, write, trackers

    def __call__(self, record: dict[str, Any]) -> None:
        self.state.log_lines += 1
        if self.write:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.trackers is not None:
            section = record.get("split", "train")
            values = {f"{section}/{k.removeprefix('eval_')}": v for k, v in record.items()
                      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.trackers.log(values, step=record["step"])


def step_line(values: list[float], *, step: int, epoch: float, lr: float, seconds: float, world: int,
              tc_weight: float | None, flops: FlopModel, peak_flops: float | None) -> dict[str, Any]:
    """The log line of the steps since the last one; `values` is StepRecord.packed() summed over ranks, read back.

    tc_weight: the TC loss's weight in the total, None when training has no TC loss.
    """
    lm_sum, tc_sum, *counts = values
    work = dict(zip(StepRecord.SUMMED, (int(n) for n in counts)))
    lm_mean, tc_mean = lm_sum / work["targets"], tc_sum / (work["micro_batches"] / world)
    total = lm_mean + (tc_weight * tc_mean if tc_weight is not None else 0.0)
    seconds = max(seconds, 1e-9)
    model_flops = flops(work["tokens"], work["sq_tokens"], work["targets"])
    line = {"step": step, "epoch": round(epoch, 4), "loss": total, "lm_loss": lm_mean, "tc_loss": tc_mean, "lr": lr,
            "samples_per_s": work["rows"] / seconds, "tokens_per_s": work["tokens"] / seconds,
            "model_tflops_per_s": model_flops / seconds / 1e12, "seconds": seconds,
            "rows": work["rows"], "tokens": work["tokens"], "target_tokens": work["targets"],
            "sq_tokens": work["sq_tokens"], "padded_tokens": work["padded"], "attended": work["attended"]}
    if peak_flops:
        line["mfu"] = model_flops / seconds / peak_flops
    return line


def device_peak_flops(device: torch.device, bf16: bool) -> float | None:
    """The peak MFU is measured against: a known GPU's bf16 peak under bf16 autocast; None otherwise."""
    if device.type != "cuda" or not bf16:
        return None
    peak = peak_bf16_tflops(torch.cuda.get_device_name(device))
    return peak * 1e12 if peak else None
