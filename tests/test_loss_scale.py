"""A resumed fp16 run continues at the loss scale it had reached: the GradScaler's state is in the checkpoint.

accelerate makes no scaler on the CPU, so these runs are handed a CPU `torch.amp.GradScaler`: its state_dict
and its update rule are CUDA's. With growth_interval 1 the scale doubles after every step without an inf, so the
scale a run ends at counts the steps its scaler has seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from training_runs import TINY, tmwpl_rows, write_jsonl

import ncal_core.train.setup as train_setup
from ncal_core.cli import parse_config
from ncal_core.train.config import TrainConfig
from ncal_core.train.loop import train

pytestmark = pytest.mark.slow

INIT_SCALE = 2.0**8


@pytest.fixture
def scalers(monkeypatch) -> list[torch.amp.GradScaler]:
    """Every run of the test gets a fresh CPU scaler; the list holds them in the order the runs made them."""
    made, real = [], train_setup.make_accelerator

    def with_scaler(cfg: TrainConfig):
        accelerator = real(cfg)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=1)
        made.append(accelerator.scaler)
        return accelerator

    monkeypatch.setattr(train_setup, "make_accelerator", with_scaler)
    return made


def run(tmp_path: Path, output_dir: Path, *extra: str) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", tmwpl_rows(12))
    train(parse_config(TrainConfig, [*TINY, "--dataset_path", str(data), "--output_dir", str(output_dir),
                                     "--per_device_train_batch_size", "4", "--num_train_epochs", "1",
                                     "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "10",
                                     *extra], description="", prog="train"))


def test_resumed_run_continues_at_the_saved_loss_scale(tmp_path, monkeypatch, scalers):
    monkeypatch.setenv("NCAL_CACHE_DIR", str(tmp_path / "cache"))
    run(tmp_path, tmp_path / "whole")  # 3 steps
    state = json.loads((tmp_path / "whole" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["scaler"]["scale"] == INIT_SCALE * 4
    run(tmp_path, tmp_path / "resumed", "--resume_from_checkpoint", str(tmp_path / "whole" / "checkpoint-2"))
    whole, resumed = scalers
    # the resumed run's one step starts from checkpoint-2's scale: a restarted scaler would end at INIT_SCALE * 2
    assert whole.get_scale() == resumed.get_scale() == INIT_SCALE * 8
