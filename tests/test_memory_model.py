"""bench/memory_model.py's per-GPU predictions (--scale) against hand computations, and docs/scale.md in step."""

from __future__ import annotations

import pytest

from bench import memory_model

B, T, R = 8, 512, 8


def test_the_larger_qwen25_sizes_have_their_published_parameter_counts():
    counts = {name: memory_model.parameter_count(a) for name, a in memory_model.SCALE_ARCHS.items()}
    assert counts == {"Qwen2.5-0.5B": 494_032_768, "Qwen2.5-7B": 7_615_616_512, "Qwen2.5-14B": 14_770_033_664,
                      "Qwen2.5-32B": 32_763_876_352, "Qwen2.5-72B": 72_706_203_648}


def test_full_finetuning_sharded_over_8_gpus_as_a_hand_computation():
    a = memory_model.SCALE_ARCHS["Qwen2.5-7B"]
    P = 7_615_616_512
    # one layer: q (3584x3584 + bias), k and v (512x3584 + bias), o, gate/up/down (18944x3584), two norms
    layer = (3584 * 3584 + 3584) + 2 * (3584 * 512 + 512) + 3584 * 3584 + 3 * 3584 * 18944 + 2 * 3584
    root = P - 28 * layer
    assert root == 2 * 152064 * 3584 + 3584  # untied embeddings and head, the final norm
    row = memory_model.per_gpu(a, "full", "fsdp2", 8, B, T, R)
    assert row["weights"] == 4 * P // 8 and row["grads_and_adamw"] == 12 * P // 8
    assert row["ddp_buckets"] == row["autocast_copies"] == row["dequantized_linear"] == 0
    assert row["fsdp_gathered"] == 2 * root + 2 * 2 * layer + 4 * (root + layer)
    act = memory_model.memory(a, B, T, R, 3)
    assert row["activations"] == act["activations_checkpointed"] + act["label_only_logits_and_grad"]
    assert row["total"] == sum(row[k] for k in ("weights", "grads_and_adamw", "fsdp_gathered", "activations"))


def test_qlora_on_one_gpu_stores_the_linears_at_half_a_byte_and_the_rest_in_bf16():
    a = memory_model.SCALE_ARCHS["Qwen2.5-72B"]
    P, lora = memory_model.parameter_count(a), memory_model.lora_parameter_count(a, R)
    linears = 80 * (8192 * 8192 + 2 * 8192 * 1024 + 8192 * 8192 + 3 * 8192 * 29568)
    row = memory_model.per_gpu(a, "qlora", "ddp", 1, B, T, R)
    assert row["weights"] == int(memory_model.NF4_BYTES * linears + 2 * (P - linears) + 4 * lora)
    assert memory_model.NF4_BYTES == pytest.approx(0.5159, abs=1e-4)  # what tests/test_quantize.py measures
    assert row["grads_and_adamw"] == 12 * lora and row["dequantized_linear"] == 2 * 8192 * 29568
    assert row["fits_80gb"] and not memory_model.per_gpu(a, "lora", "ddp", 1, B, T, R)["fits_80gb"]


@pytest.mark.parametrize("method", memory_model.METHODS)
def test_sharding_shrinks_with_gpus_and_ddp_does_not(method):
    a = memory_model.SCALE_ARCHS["Qwen2.5-14B"]
    fsdp = [memory_model.per_gpu(a, method, "fsdp2", n, B, T, R)["total"] for n in (1, 2, 4, 8)]
    ddp = [memory_model.per_gpu(a, method, "ddp", n, B, T, R)["total"] for n in (2, 4, 8)]
    assert fsdp[1] > fsdp[2] > fsdp[3] and len(set(ddp)) == 1
    assert fsdp[0] == memory_model.per_gpu(a, method, "ddp", 1, B, T, R)["total"]  # one process shards nothing


def test_a_plan_is_the_fewest_gpus_that_fit_and_its_command_launches_that_many():
    a = memory_model.SCALE_ARCHS["Qwen2.5-72B"]
    row = memory_model.plan("Qwen2.5-72B", "full", B, T, R, 3)
    assert row["gpus"] == 32 and row["fits_80gb"]
    assert not memory_model.per_gpu(a, "full", "fsdp2", 16, B, T, R)["fits_80gb"]
    command = memory_model.launch_command(row)
    assert "--nnodes 4 --nproc_per_node 8" in command and "--fsdp true" in command
    one = memory_model.launch_command(memory_model.plan("Qwen2.5-7B", "qlora", B, T, R, 3))
    assert one.startswith("python -m ncal_core.train ") and "--quantization nf4" in one and "--fsdp" not in one
