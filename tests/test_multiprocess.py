"""Two CPU processes under `accelerate launch`: the same training as one process with the same global batch.

On a machine without CUDA, accelerate 1.15 starts several processes only with `--multi_gpu` (`--cpu
--num_processes 2` starts one process unless MPI is set up); ncal_core.train then joins them over gloo.
The invocation tested here:

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 --main_process_port PORT \
        -m ncal_core.train ...
"""

from __future__ import annotations

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
    TINY,
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
    write_jsonl,
)

pytestmark = pytest.mark.slow

# Two processes sum each batch's loss in halves and average gradients across them: fp32 rounding in
# another order than one process, which Adam turns into different steps wherever a gradient is near 0
# (its step is ~lr whatever the gradient's size). Measured over 6 seeds with the logit-adjusted
# loss on, 15 steps at lr 1e-3: every weight within 1e-6 of the one-process run in 5 seeds, 2.5e-5 in one;
# a term combined wrongly across ranks (a factor on one loss's gradient) moves weights by ~1e-3. The
# key-projection bias has a true gradient of 0 (a bias on every key shifts all of a query's scores alike,
# which softmax ignores): rounding noise alone moves it, by up to ~lr a step.
WEIGHT_ATOL = 1e-4
KEY_BIAS_ATOL = 1e-3
LOSS_RTOL = 1e-5  # measured ~2e-7


def launch(args: list, env: dict[str, str], *, script: Path | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """accelerate launch of 2 CPU processes, run to completion."""
    return launch_to_end(accelerate_command(args, script), env, timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("multiprocess")
    train = write_jsonl(root / "train.jsonl", tmwpl_rows(60))
    evals = write_jsonl(root / "eval.jsonl", tmwpl_rows(12, seed=1, prefix="e"))
    # full fine-tuning of the tiny model (no dropout anywhere), TC on with lambda 1 so the all-gathered TC
    # loss and its gradient are part of what must match
    # the logit-adjusted loss on and no re-sampling: the settings WEIGHT_ATOL was measured with
    flags = ["--dataset_path", train, "--eval_dataset_path", evals, *TINY, "--use_lora", "false",
             "--la_loss_tau", "1", "--resample", "none", "--lambda_lc", "1", "--num_train_epochs", "1", "--save_strategy", "steps", "--save_steps", "3",
             "--save_total_limit", "100", "--logging_steps", "1", "--seed", "3"]
    base = make_checkpoint_with_tokenizer(root / "base", hidden_size=32, intermediate_size=64, layers=1, heads=2,
                                          kv_heads=1)
    lora = ["--dataset_path", train, "--eval_dataset_path", evals, "--model_name_or_path", base,
            "--lora_dropout", "0.1", "--lambda_lc", "1", "--num_train_epochs", "1", "--save_strategy", "steps",
            "--save_steps", "3", "--save_total_limit", "100", "--logging_steps", "1", "--seed", "3",
            "--per_device_train_batch_size", "2", "--val_size", "0"]
    return {"root": root, "flags": flags, "lora": lora, "env": command_env(root / "cache")}


def test_two_processes_match_one_process_with_the_same_global_batch(setup):
    one, two = setup["root"] / "one", setup["root"] / "two"
    single = run("ncal_core.train", [*setup["flags"], "--per_device_train_batch_size", "4", "--output_dir", one],
                 setup["env"])
    assert single.returncode == 0, single.stderr[-3000:]
    started = time.monotonic()
    double = launch([*setup["flags"], "--per_device_train_batch_size", "2", "--output_dir", two], setup["env"])
    assert double.returncode == 0, double.stderr[-5000:]
    print(f"2 processes: {time.monotonic() - started:.1f} s")

    # logs and checkpoints come from the main process only: every line once, the same checkpoints
    lines_one, lines_two = metrics(one), metrics(two)
    assert [(r["step"], r.get("eval")) for r in lines_two] == [(r["step"], r.get("eval")) for r in lines_one]
    assert len(lines_two) == 16  # 15 steps + the final evaluation
    assert sorted(p.name for p in two.iterdir() if p.name.startswith(("checkpoint-", ".tmp"))) == \
        sorted(p.name for p in one.iterdir() if p.name.startswith(("checkpoint-", ".tmp")))
    assert (two / "checkpoint-3" / "model.safetensors").is_file()
    def reports(out: str) -> int:  # the results table starts with its accuracy line, once per printed report
        return sum(line.startswith("accuracy ") for line in out.splitlines())

    assert reports(double.stdout) == reports(single.stdout) == 1

    worst = 0.0
    for a, b in zip(lines_one, lines_two, strict=True):
        assert a.get("lr") == b.get("lr")
        for key in ("loss", "lm_loss", "tc_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL, abs=1e-7), (a, b)
                worst = max(worst, abs(a[key] - b[key]) / max(abs(a[key]), 1e-12))
    assert any(r.get("tc_loss", 0) > 0 for r in lines_two)  # the TC loss was on
    w_one, w_two = final_weights(one), final_weights(two)
    key_bias = {k for k in w_one if k.endswith("k_proj.bias")}
    diff = max_abs_diff({k: w_one[k] for k in w_one.keys() - key_bias}, {k: w_two[k] for k in w_two.keys() - key_bias})
    bias_diff = max_abs_diff({k: w_one[k] for k in key_bias}, {k: w_two[k] for k in key_bias})
    print(f"max |weights(1 process) - weights(2 processes)| = {diff:.3g} (k_proj.bias: {bias_diff:.3g}); "
          f"worst relative loss difference {worst:.3g}")
    worst_name = max(w_one.keys() - key_bias, key=lambda k: (w_one[k].double() - w_two[k].double()).abs().max())
    assert diff <= WEIGHT_ATOL, worst_name
    assert bias_diff <= KEY_BIAS_ATOL
    assert eval_report(two)["accuracy"] == pytest.approx(eval_report(one)["accuracy"], abs=1 / 12 + 1e-9)


@pytest.mark.parametrize("kind", ["crash", "user"])
def test_a_failing_rank_stops_the_others_with_its_error(setup, kind):
    """Rank 1 raises at its third micro-batch, while rank 0 waits for it in a collective: nobody hangs."""
    env = {**setup["env"], "NCAL_FAIL_RANK": "1", "NCAL_FAIL_AT": "3", "NCAL_FAIL_KIND": kind}
    started = time.monotonic()
    proc = launch([*setup["flags"], "--per_device_train_batch_size", "2", "--output_dir",
                   setup["root"] / f"fail-{kind}"], env, script=Path(__file__).with_name("rank_failure_probe.py"),
                  timeout=120)
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "injected failure on rank 1 at micro-batch 3" in output
    if kind == "user":
        assert "error: injected failure on rank 1 at micro-batch 3" in output
    assert elapsed < 120
    print(f"{kind}: launcher exited {proc.returncode} after {elapsed:.1f} s")


def test_ctrl_c_stops_both_ranks_at_one_step_and_resuming_matches(setup):
    """Ctrl-C reaches the launcher and both ranks; they stop after the same step, save it, and resume exactly.

    LoRA with dropout: each rank draws its masks from its own RNG stream, which the checkpoint must keep.
    """
    reference, run_dir = setup["root"] / "lora-reference", setup["root"] / "lora-interrupted"
    done = launch([*setup["lora"], "--output_dir", reference], setup["env"])
    assert done.returncode == 0, done.stderr[-5000:]
    seed = int(os.environ.get("NCAL_TEST_SEED", random.randrange(10**6)))
    at = random.Random(seed).randint(3, 11)
    with open(setup["root"] / "interrupted.log", "w") as log:
        proc = subprocess.Popen(accelerate_command([*setup["lora"], "--output_dir", run_dir]), env=setup["env"],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while logged_steps(run_dir) < at:
        assert proc.poll() is None and time.monotonic() < deadline, f"seed {seed}"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    proc.wait(timeout=120)
    output = (setup["root"] / "interrupted.log").read_text()
    assert f"interrupted: saved {run_dir}/checkpoint-" in output
    assert not (run_dir / "eval.json").exists()
    newest = max(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
    assert newest == logged_steps(run_dir) >= at, f"seed {seed}: {output[-3000:]}"
    resumed = launch([*setup["lora"], "--output_dir", run_dir, "--resume_from_checkpoint", "latest"], setup["env"])
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert max_abs_diff(final_weights(run_dir), final_weights(reference)) <= 1e-6
    assert eval_report(run_dir) == eval_report(reference)
    assert metrics(run_dir) == metrics(reference)
