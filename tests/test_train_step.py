"""A whole training step, and a scoring batch, with every tensor on the `meta` device.

Why `meta` stands in for CUDA here: it is a real non-CPU device to PyTorch's dispatcher, so every op that
mixes a CPU tensor into device tensors (`torch.stack`, `cat`, `+` with a non-scalar CPU operand, indexing
with CPU index tensors) raises exactly as it does on CUDA, and so does reading a value on the host
(`.item()`, `.tolist()`, `bool(t)`), which on CUDA would be a silent sync. Shapes, dtypes and autograd run
for real; no number is computed, so the test checks placement, not values (other tests check values).
The loop reads the device once per log step, through `train_step.host_values`; the step itself never does.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator

from ncal_core.data.prompts import EncodedRow
from ncal_core.evaluation.scoring import score_labels
from ncal_core.loss.logit_adjustment import label_decisions, log_prior
from ncal_core.loss.objective import TrainingObjective
from ncal_core.loss.tc import simplex_etf
from ncal_core.model.lora import inject_lora
from ncal_core.model.qwen import ModelConfig, QwenModel
from ncal_core.train.config import TrainConfig
from ncal_core.train.schedule import make_scheduler
from ncal_core.train.step import StepParts, StepRecord, train_step

META = torch.device("meta")
K = 3


def _model() -> QwenModel:
    config = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True,
                         max_position_embeddings=128)
    return QwenModel(config, device=META)


def _rows(n: int) -> list[EncodedRow]:
    """n rows of K classes, prompts of varying length, labels of one or two tokens and eos (id 1)."""
    return [EncodedRow(input_ids=[5 + (i + j) % 50 for j in range(4 + i % 5)] + [60 + i % K] * (1 + i % 2) + [1],
                       prompt_len=4 + i % 5, label_index=i % K, example_id=str(i)) for i in range(n)]


def _parts(cfg: TrainConfig, model: QwenModel, rows: list[EncodedRow]) -> StepParts:
    # labels of which two share a first token, so that rows make two decisions (meta tensors: shapes only)
    decisions = label_decisions([[60, 1], [60, 61, 1], [62, 1]], [4, 2, 1]).to(META) if cfg.la_loss_tau > 0 else None
    tc = replace(cfg.tc, backend="torch")
    objective = TrainingObjective(model, tc=tc, padding_free=cfg.padding_free, decisions=decisions)
    # the loop's fused AdamW has kernels for real devices only; the single-tensor one runs the same update on any
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=False)
    etf = simplex_etf(K, 32, 0).to(META) if cfg.tc_variant == "etf_target" else None
    return StepParts(accelerator=MetaAccelerator(cpu=True), objective=objective, optimizer=optimizer,
                     scheduler=make_scheduler(optimizer, "linear", 1, 4), encoded=rows, pad_id=0, cfg=cfg,
                     prior_log=log_prior([4, 2, 1]).to(META), etf_targets=etf, tc=tc, decisions=decisions)


class MetaAccelerator(Accelerator):
    """A lone process whose device is `meta`: the step puts its batches where the accelerator says."""

    device = META


@pytest.fixture(autouse=True)
def no_host_reads(monkeypatch):
    """A host read of a meta tensor raises anyway; this makes the message say what happened."""
    def refuse(tensor):
        raise AssertionError("a training step read a device value on the host")
    monkeypatch.setattr("ncal_core.train.step.host_values", refuse)


@pytest.mark.parametrize("flags", [
    dict(),                                                        # the default: padding-free, mean pooling
    dict(padding_free=False, pooling="last", la_loss_tau=1.0),    # padded batch, the logit-adjusted loss
    dict(tc_variant="etf_target", pooling="seq_last", max_grad_norm=0.0),
    dict(use_lora=True, lora_dropout=0.1),                        # adapters: LoRA's own forward and backward
])
def test_a_training_step_keeps_every_tensor_on_the_device(flags):
    cfg = TrainConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, **flags)
    model = _model()
    if cfg.use_lora:
        inject_lora(model, r=4, alpha=8, dropout=cfg.lora_dropout)
    parts = _parts(cfg, model, _rows(8))
    record = train_step(parts, [[0, 1, 2, 3], [4, 5, 6, 7]], StepRecord.zero(META))
    record = train_step(parts, [[7, 6, 5, 4], [3, 2, 1, 0]], record)
    assert record.lm_sum.device == META and record.tc_sum.device == META
    assert (record.micro_batches, record.rows) == (4, 16)
    assert record.targets == 2 * sum(len(r.input_ids) - r.prompt_len for r in _rows(8))
    assert record.tokens == 2 * sum(len(r.input_ids) for r in _rows(8)) and record.rows == 16
    assert record.packed().device == META and record.packed().shape == (2 + len(StepRecord.SUMMED),)
    assert all(p.device == META for p in model.parameters())
    state = parts.optimizer.state[next(p for p in model.parameters() if p.requires_grad)]
    assert state["exp_avg"].device == META  # the update ran, on the device


def test_a_scoring_batch_keeps_every_tensor_on_the_device():
    model = _model().eval()
    scores = score_labels(model, [[5, 6, 7], [8, 9, 10, 11, 12]], [[60, 1], [61, 62, 1], [62, 1]])
    assert scores.device == META and scores.shape == (2, K)
