"""FSDP2 (--fsdp true) with two CPU processes over gloo: one process's training, exact resumes, the usual outputs.

The launches tested, as a user types them:

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT -m ncal_core.train --fsdp true ...
    python -m accelerate.commands.launch --multi_gpu --num_processes 2 ... -m ncal_core.train --fsdp true ...
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from checkpoint_with_tokenizer import make_checkpoint_with_tokenizer
from training_runs import (
    REPO,
    accelerate_command,
    command_env,
    eval_report,
    final_weights,
    launch_to_end,
    logged_steps,
    max_abs_diff,
    metrics,
    run,
    tmwpl_rows,
    torchrun_command,
    write_jsonl,
)

pytestmark = pytest.mark.slow

# Two processes reduce each gradient in another order than one process (FSDP2 reduce-scatters the halves'
# gradients, averaged, where one process sums the whole batch): fp32 rounding, which Adam turns into steps of
# up to ~lr wherever a gradient is near 0. Measured on these runs: losses within 2e-7 relative, weights within
# 4e-6 (the key-projection bias, whose true gradient is 0: rounding alone moves it) and 3e-7 elsewhere; a term
# combined wrongly across ranks (a gradient counted once per rank) moves weights by ~1e-3.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-4
KEY_BIAS_ATOL = 1e-3
# bf16: FSDP2 gathers the fp32 LoRA factors in bf16 where one process's autocast casts them at each matmul, and
# reduces gradients in another order: bf16 rounding (2^-8 relative), which Adam's lr-sized steps carry into the
# weights. Measured: losses within 8.5e-4 relative, weights within 4.2e-4.
BF16_TOLERANCE = (2e-2, 5e-3)  # loss rtol, weight atol
RESUME_ATOL = 1e-6  # a resumed run repeats the same arithmetic: measured 0


def torchrun(args: list, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """torchrun of 2 CPU processes running ncal_core.train with args, to completion."""
    return launch_to_end(torchrun_command(args), env, timeout)


def accelerate_launch(args: list, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu` of 2 CPU processes (how accelerate starts several on a CPU machine)."""
    return launch_to_end(accelerate_command(args), env, timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fsdp")
    train = write_jsonl(root / "train.jsonl", tmwpl_rows(40))
    evals = write_jsonl(root / "eval.jsonl", tmwpl_rows(8, seed=1, prefix="e"))
    common = ["--dataset_path", train, "--eval_dataset_path", evals, "--lambda_lc", "1", "--num_train_epochs", "1",
              "--logging_steps", "1", "--seed", "3", "--save_strategy", "steps", "--save_steps", "3",
              "--save_total_limit", "100"]
    # full fine-tuning of the tiny model (two layers: two FSDP units under the root), TC and the logit-adjusted
    # loss on, a development split (evaluated with the root's weights gathered, its best checkpoint loaded back)
    full = [*common, "--tiny_hidden_size", "32", "--tiny_num_layers", "2", "--tiny_vocab_size", "300",
            "--use_lora", "false", "--la_loss_tau", "1", "--resample", "none", "--val_size", "0.2"]
    base = make_checkpoint_with_tokenizer(root / "base", hidden_size=32, intermediate_size=64, layers=2, heads=2,
                                          kv_heads=1)
    lora = [*common, "--model_name_or_path", base, "--val_size", "0"]
    return {"root": root, "common": common, "full": full, "lora": lora, "env": command_env(root / "cache")}


def assert_same_training(one: Path, two: Path, loss_rtol: float = LOSS_RTOL, weight_atol: float = WEIGHT_ATOL) -> None:
    """Two runs logged the same steps, learning rates and losses, and ended with the same weights."""
    lines_one, lines_two = metrics(one), metrics(two)
    assert [(r["step"], r.get("eval")) for r in lines_two] == [(r["step"], r.get("eval")) for r in lines_one]
    worst = max(abs(b[k] - a[k]) / abs(a[k]) for a, b in zip(lines_one, lines_two) for k in ("loss", "lm_loss", "tc_loss")
                if a.get(k))
    print(f"{two.name}: worst relative loss difference {worst:.2g}, max |weights| difference "
          f"{max_abs_diff(final_weights(one), final_weights(two)):.2g}")
    for a, b in zip(lines_one, lines_two, strict=True):
        assert a.get("lr") == b.get("lr")
        for key in ("loss", "lm_loss", "tc_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=loss_rtol, abs=1e-7), (a, b)
    assert any(r.get("tc_loss", 0) > 0 for r in lines_two)  # the TC loss, over the gathered batch, was on
    w_one, w_two = final_weights(one), final_weights(two)
    key_bias = {k for k in w_one if k.endswith("k_proj.bias")}
    assert max_abs_diff({k: w_one[k] for k in w_one.keys() - key_bias},
                        {k: w_two[k] for k in w_two.keys() - key_bias}) <= weight_atol
    if key_bias:
        assert max_abs_diff({k: w_one[k] for k in key_bias}, {k: w_two[k] for k in key_bias}) <= KEY_BIAS_ATOL


def test_sharded_full_finetuning_matches_one_process(setup):
    one, two = setup["root"] / "full-one", setup["root"] / "full-two"
    single = run("ncal_core.train", [*setup["full"], "--per_device_train_batch_size", "4", "--output_dir", one],
                 setup["env"])
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = torchrun([*setup["full"], "--per_device_train_batch_size", "2", "--fsdp", "true", "--output_dir", two],
                       setup["env"])
    assert sharded.returncode == 0, sharded.stderr[-5000:]
    assert_same_training(one, two)
    assert eval_report(two)["dev"]["weights_from"] == eval_report(one)["dev"]["weights_from"]
    # checkpoints: the weights consolidated as one process writes them, the optimizer state sharded by rank
    checkpoint = two / "checkpoint-3"
    assert (checkpoint / "model.safetensors").is_file() and not (checkpoint / "optimizer.pt").exists()
    assert (checkpoint / "optimizer" / ".metadata").is_file()
    assert len(list((checkpoint / "optimizer").glob("*.distcp"))) == 2


def test_sharded_lora_under_accelerate_matches_one_process_and_exports(setup):
    one, two = setup["root"] / "lora-one", setup["root"] / "lora-two"
    flags = [*setup["lora"], "--lora_dropout", "0"]  # no dropout: each rank draws its own masks
    single = run("ncal_core.train", [*flags, "--per_device_train_batch_size", "4", "--output_dir", one],
                 setup["env"])
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = accelerate_launch([*flags, "--per_device_train_batch_size", "2", "--fsdp", "true", "--output_dir", two],
                                setup["env"])
    assert sharded.returncode == 0, sharded.stderr[-5000:]
    assert (two / "adapter_model.safetensors").is_file() and (two / "checkpoint-3" / "optimizer").is_dir()
    assert_same_training(one, two)
    exported = {}
    for name, folder in (("one", one), ("two", two)):
        out = setup["root"] / f"export-{name}"
        done = run("ncal_core.export", ["--model_path", folder, "--output_dir", out, "--dtype", "float32"],
                   setup["env"])
        assert done.returncode == 0, done.stderr[-3000:]
        exported[name] = final_weights(out)
    assert max_abs_diff(exported["one"], exported["two"]) <= WEIGHT_ATOL


@pytest.fixture(scope="module")
def lora_reference(setup) -> Path:
    """A sharded LoRA run with dropout (each rank's masks from its own RNG stream), checkpoints every 3 steps."""
    out = setup["root"] / "lora-dropout"
    done = torchrun([*setup["lora"], "--per_device_train_batch_size", "2", "--fsdp", "true", "--output_dir", out],
                    setup["env"])
    assert done.returncode == 0, done.stderr[-5000:]
    return out


def test_an_interrupted_sharded_run_resumes_exactly(setup, lora_reference):
    """Ctrl-C stops both ranks after the same step; each writes its optimizer shard into the checkpoint, and
    resuming ends where the uninterrupted run did (LoRA dropout: each rank's RNG stream is kept too)."""
    out = setup["root"] / "lora-interrupted"
    flags = [*setup["lora"], "--per_device_train_batch_size", "2", "--fsdp", "true", "--output_dir", out]
    seed = int(os.environ.get("NCAL_TEST_SEED", random.randrange(10**6)))
    at = random.Random(seed).randint(2, 7)  # of 10 steps
    with open(setup["root"] / "interrupted.log", "w") as log:
        proc = subprocess.Popen(torchrun_command(flags), env=setup["env"], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while logged_steps(out) < at:
        assert proc.poll() is None and time.monotonic() < deadline, f"seed {seed}"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    proc.wait(timeout=120)
    output = (setup["root"] / "interrupted.log").read_text()
    assert f"interrupted: saved {out}/checkpoint-" in output, f"seed {seed}: {output[-3000:]}"
    newest = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert newest == logged_steps(out) >= at and (out / f"checkpoint-{newest}" / "optimizer" / ".metadata").is_file()
    done = torchrun([*flags, "--resume_from_checkpoint", "latest"], setup["env"])
    assert done.returncode == 0, done.stderr[-5000:]
    assert max_abs_diff(final_weights(out), final_weights(lora_reference)) <= RESUME_ATOL
    assert metrics(out) == metrics(lora_reference)
    assert eval_report(out) == eval_report(lora_reference)


def test_a_sharded_checkpoint_resumed_by_another_number_of_processes_is_refused(setup, lora_reference):
    done = run("ncal_core.train", [*setup["lora"], "--per_device_train_batch_size", "4", "--fsdp", "true",
                                   "--output_dir", setup["root"] / "lora-one-process", "--resume_from_checkpoint",
                                   lora_reference / "checkpoint-3"], setup["env"])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: --resume_from_checkpoint {lora_reference / 'checkpoint-3'}: saved by 2 process(es), resumed with 1")


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao (pip install 'ncal[qlora]')")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sharded_qlora_matches_one_process(setup, precision):
    """NF4 weights sharded by FSDP2 (their 4-bit codes and scales all-gathered over gloo) against one process;
    bf16: a bf16 base under --bf16, FSDP2's MixedPrecisionPolicy against one process's autocast."""
    # 256 wide: every weight's 4-bit scales fill whole blocks of 256 on each of 2 shards, so one and two
    # processes quantize alike
    base = make_checkpoint_with_tokenizer(setup["root"] / "base256", hidden_size=256, intermediate_size=512,
                                          layers=1, heads=4, kv_heads=2)
    flags = [*setup["common"], "--model_name_or_path", base, "--val_size", "0", "--lora_dropout", "0",
             "--quantization", "nf4", *(["--torch_dtype", "bfloat16", "--bf16", "true"] if precision == "bf16" else [])]
    one, two = setup["root"] / f"qlora-{precision}-one", setup["root"] / f"qlora-{precision}-two"
    single = run("ncal_core.train", [*flags, "--per_device_train_batch_size", "4", "--output_dir", one], setup["env"])
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = torchrun([*flags, "--per_device_train_batch_size", "2", "--fsdp", "true", "--output_dir", two],
                       setup["env"])
    assert sharded.returncode == 0, sharded.stderr[-5000:]
    assert_same_training(one, two, *BF16_TOLERANCE if precision == "bf16" else ())


def test_one_process_has_nothing_to_shard_and_says_so(setup):
    out = setup["root"] / "one-process-fsdp"
    done = run("ncal_core.train", [*setup["full"], "--per_device_train_batch_size", "4", "--fsdp", "true",
                                   "--max_steps", "2", "--output_dir", out], setup["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "note: --fsdp true with one process: nothing to shard, the model trains whole" in done.stdout
    assert (out / "model.safetensors").is_file()
