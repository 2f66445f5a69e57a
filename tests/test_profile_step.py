"""bench/profile_step.py records exactly the optimizer steps after the skipped ones, and groups ops by kind."""

from __future__ import annotations

import json

import pytest
from checkpoint_with_tokenizer import LABELS, TEXTS, make_checkpoint_with_tokenizer

from bench import profile_step


@pytest.mark.parametrize("op, group", [("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::copy_",
                                       "dtype casts and copies"), ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                       "attention (SDPA)"), ("aten::random_", "LoRA dropout masks"),
                                      ("aten::silu_backward", "elementwise"), ("aten::mul", "elementwise"),
                                      ("aten::_log_softmax_backward_data", "log-softmax (the head's loss)"),
                                      ("aten::empty_strided", "other"), ("aten::mmx", "other")])
def test_every_op_falls_in_its_group(op, group):
    assert profile_step.group_of(op) == group


def test_a_profile_records_only_the_steps_after_the_skipped_ones(tmp_path):
    base = make_checkpoint_with_tokenizer(tmp_path / "base", hidden_size=32, intermediate_size=64, layers=1, heads=2,
                                          kv_heads=1)
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps({"id": f"r{i}", "question": text, "class": LABELS[i % len(LABELS)]},
                                       ensure_ascii=False) + "\n" for i, text in enumerate(TEXTS[:24])),
                    encoding="utf-8")
    run = profile_step.profile_run(str(base), 3, ["--dataset_path", str(rows), "--per_device_train_batch_size", "2"],
                                   tmp_path / "run")
    # 2 skipped + 3 recorded steps ran; the profiler saw the optimizer step of the 3 recorded ones only
    assert run["steps"] == 3
    assert run["ops"]["Optimizer.step#AdamW.step"]["calls"] == 3
    summary = profile_step.summarise("float32", run)
    assert sum(summary["shares"].values()) == pytest.approx(1.0)
    assert summary["shares"]["matmul"] > 0 and summary["seconds_per_step"] > 0
