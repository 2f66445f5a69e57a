"""TrainConfig.check: combinations that cannot train correctly are refused in one line naming the flag."""

from __future__ import annotations

import pytest

from ncal_core.errors import NCALError
from ncal_core.train.config import TrainConfig


@pytest.mark.parametrize("flags", [
    dict(use_lora=False, torch_dtype="float16", fp16=True),   # the fp16 scaler refuses fp16 gradients
    dict(use_lora=False, torch_dtype="bfloat16"),             # AdamW on bf16 weights loses small updates
    dict(torch_dtype="bfloat16"),                              # the built-in tiny model trains every weight
])
def test_half_precision_weights_are_not_fully_fine_tuned(flags):
    with pytest.raises(NCALError, match=r"^--torch_dtype: .* cannot be fully fine-tuned .*--torch_dtype float32 "
                                        r"with --bf16 true"):
        TrainConfig(**flags).check()


@pytest.mark.parametrize("flags", [
    dict(use_lora=False, torch_dtype="float32", bf16=True),    # fp32 master weights under autocast
    dict(model_name_or_path="some/qwen", torch_dtype="bfloat16", bf16=True),  # LoRA keeps its own weights fp32
])
def test_mixed_precision_with_fp32_trainable_weights_is_accepted(flags):
    TrainConfig(**flags).check()


def test_the_process_group_timeout_must_be_positive():
    with pytest.raises(NCALError, match="^--ddp_timeout: must be >= 1 second"):
        TrainConfig(ddp_timeout=0).check()


def test_the_process_group_timeout_reaches_accelerate():
    """accelerate hands its InitProcessGroupKwargs to torch.distributed.init_process_group (NCCL's default: 600 s)."""
    from datetime import timedelta

    from ncal_core.train.loop import make_accelerator
    assert make_accelerator(TrainConfig(ddp_timeout=5400)).init_handler.timeout == timedelta(seconds=5400)
