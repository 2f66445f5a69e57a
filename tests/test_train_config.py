"""TrainConfig.check: combinations that cannot train correctly are refused in one line naming the flag."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

from ncal_core.errors import NCALError
from ncal_core.loss.tc import TCConfig
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

    from ncal_core.train.setup import make_accelerator
    assert make_accelerator(TrainConfig(ddp_timeout=5400)).init_handler.timeout == timedelta(seconds=5400)


# one value each flag's check refuses; the test below fails when a check is added without an entry here
REFUSED = {
    "truncation": "right", "pooling": "max", "tc_variant": "pair", "tc_backend": "cuda", "e_w": 0.0, "lambda_lc": -1.0,
    "resample": "half", "dev_per_class": -1, "val_size": 1.5, "resample_epochs": -1, "la_loss_tau": -0.5,
    "logit_adjust_tau": -1.0, "dev_weighting": "prior", "head": "mlp",
    "lr_scheduler_type": "step", "save_strategy": "always", "eval_strategy": "always", "eval_steps": 0, "torch_dtype": "int8",
    "ddp_timeout": 0, "lora_r": 0, "lora_dropout": 1.0, "learning_rate": 0.0, "warmup_ratio": 1.0,
    "per_device_train_batch_size": 0, "per_device_eval_batch_size": 0, "gradient_accumulation_steps": 0,
    "logging_steps": 0, "save_steps": 0, "cutoff_len": 0, "save_total_limit": 0, "num_train_epochs": 0.0,
    "max_grad_norm": -1.0, "label_types": ["a"], "fp16": True, "report_to": "mlflow", "quantization": "int8",
    "fsdp": True,
}


def _checked_flags() -> set[str]:
    """Every flag name the checks of TrainConfig and TCConfig can put at the start of a refusal."""
    source = inspect.getsource(TrainConfig.check) + inspect.getsource(TCConfig.check)
    names = set(re.findall(r'bad\("(\w+)"', source)) | set(re.findall(r'--(\w+):', source))
    for group in re.findall(r"for (?:name|flag)[^:]* in \(([^:]*)\):", source, re.S):
        names |= set(re.findall(r'\("?(\w+)"?,', group)) | set(re.findall(r'"(\w+)"', group))
    return {n for n in names if n in {f.name for f in dataclasses.fields(TrainConfig)}}


def test_every_checked_flag_has_a_refused_value():
    checked = _checked_flags()
    assert len(checked) >= 25 and checked - set(REFUSED) == set()


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_refused_value_is_one_line_naming_the_flag(name):
    extra = {"fp16": {"bf16": True}, "lora_r": {"use_lora": True}, "fsdp": {"head": "linear"}}.get(name, {})
    with pytest.raises(NCALError) as err:
        TrainConfig(**{name: REFUSED[name], **extra}).check()
    assert str(err.value).startswith(f"--{name}:") and "\n" not in str(err.value)


def test_label_types_are_checked_as_every_class_flag_is():
    """--label_types had its own copy of the class-name check, which did not say which class was repeated."""
    with pytest.raises(NCALError, match=r"^--label_types: names the class 'a' twice$"):
        TrainConfig(label_types=["a", "b", "a"]).check()
