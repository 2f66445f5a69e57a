"""Interrupted runs: killed, Ctrl-C'd or half-written, a resumed run ends exactly where an uninterrupted one does.

Every run is a real `python -m ncal_core.train` on 60 tiny rows: 2 epochs of 15 steps, a checkpoint
every 2 steps and an evaluation at the end of each epoch, in two modes: full fine-tuning of the
built-in tiny model, and LoRA (dropout 0.1, so the restored RNG matters) on a random transformers Qwen2.
Runs are compared with the uninterrupted run of the same mode: final weights (bit for bit; the
tolerance allowed is 1e-6), eval.json, and every line of metrics.jsonl but the throughput.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from checkpoint_with_tokenizer import make_checkpoint_with_tokenizer
from training_runs import (
    REPO,
    TINY,
    command,
    command_env,
    eval_report,
    final_weights,
    logged_steps,
    max_abs_diff,
    metrics,
    run,
    tmwpl_rows,
    write_jsonl,
)

pytestmark = pytest.mark.slow

STEPS = 30  # 2 epochs x 60 rows / batch 4
TOLERANCE = 1e-6
# a seed for where runs are interrupted; printed on failure so a failing case can be replayed
SEED = int(os.environ.get("NCAL_TEST_SEED", random.randrange(10**6)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Data, the LoRA base checkpoint, the model cache and the flags of each mode."""
    root = tmp_path_factory.mktemp("resume")
    train = write_jsonl(root / "train.jsonl", tmwpl_rows(60))
    evals = write_jsonl(root / "eval.jsonl", tmwpl_rows(12, seed=1, prefix="e"))
    base = make_checkpoint_with_tokenizer(root / "base", hidden_size=32, intermediate_size=64, layers=1, heads=2,
                                          kv_heads=1)
    common = ["--dataset_path", train, "--eval_dataset_path", evals, "--per_device_train_batch_size", "4",
              "--num_train_epochs", "2", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1",
              "--save_total_limit", "100", "--lambda_lc", "1", "--seed", "7", "--val_size", "0"]
    return {"root": root, "env": command_env(root / "cache"),
            "flags": {"full": [*common, *TINY, "--use_lora", "false"],
                      "lora": [*common, "--model_name_or_path", base, "--lora_dropout", "0.1"]}}


def train(setup: dict, mode: str, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = run("ncal_core.train", [*setup["flags"][mode], "--output_dir", output_dir, *extra], setup["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def reference(setup) -> dict[str, Path]:
    """The uninterrupted run of each mode."""
    out = {}
    for mode in ("full", "lora"):
        out[mode] = setup["root"] / f"reference-{mode}"
        train(setup, mode, out[mode])
    return out


def start(setup: dict, mode: str, output_dir: Path) -> subprocess.Popen:
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(output_dir.parent / f"{output_dir.name}.log", "w") as log:
        return subprocess.Popen(command("ncal_core.train", [*setup["flags"][mode], "--output_dir", output_dir]),
                                env=setup["env"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def interrupt(setup: dict, mode: str, output_dir: Path, sig: signal.Signals, rng: random.Random) -> tuple[int, int]:
    """Start a run and send it `sig` once it has logged a random step after its first checkpoint.

    Returns (the step it was signalled at, its exit code).
    """
    at = rng.randint(3, STEPS - 4)
    proc = start(setup, mode, output_dir)
    deadline = time.monotonic() + 300
    while logged_steps(output_dir) < at or not list(output_dir.glob("checkpoint-*")):
        assert proc.poll() is None, (output_dir.parent / f"{output_dir.name}.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    assert not (output_dir / "eval.json").exists(), "the run ended before it was interrupted"
    return at, code


@pytest.fixture(scope="module")
def killed(setup, reference) -> dict[str, Path]:
    """A run of each mode killed with SIGKILL at a random step after its first checkpoint."""
    rng = random.Random(SEED)
    out = {}
    for mode in ("full", "lora"):
        out[mode] = setup["root"] / f"killed-{mode}"
        _, code = interrupt(setup, mode, out[mode], signal.SIGKILL, rng)
        assert code == -signal.SIGKILL
    return out


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    """Final weights within TOLERANCE (in practice bit-identical), same eval.json, same metrics.jsonl."""
    diff = max_abs_diff(final_weights(run_dir), final_weights(reference_dir))
    assert diff <= TOLERANCE, f"final weights differ by {diff} (seed {SEED})"
    assert eval_report(run_dir) == eval_report(reference_dir), f"seed {SEED}"
    assert metrics(run_dir) == metrics(reference_dir), f"seed {SEED}"


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_from_a_named_checkpoint_matches_uninterrupted_run(setup, reference, killed, mode, tmp_path):
    """Resume a killed run from its first checkpoint, named by its folder (newer ones are there too, mostly)."""
    run_dir = copy_run(killed[mode], tmp_path / "run")
    assert (run_dir / "checkpoint-2").is_dir()
    train(setup, mode, run_dir, "--resume_from_checkpoint", run_dir / "checkpoint-2")
    assert_same_run(run_dir, reference[mode])


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_latest_after_sigkill_matches_uninterrupted_run(setup, reference, killed, mode, tmp_path):
    run_dir = copy_run(killed[mode], tmp_path / "run")
    train(setup, mode, run_dir, "--resume_from_checkpoint", "latest")
    assert_same_run(run_dir, reference[mode])


def test_half_written_checkpoint_is_ignored_with_a_warning(setup, reference, killed, tmp_path):
    run_dir = copy_run(killed["full"], tmp_path / "run")
    # what a crash inside save_checkpoint leaves: a hidden folder, newer than any complete checkpoint
    leftover = run_dir / ".tmp-checkpoint-checkpoint-28-4242"
    leftover.mkdir()
    (leftover / "trainer_state.json").write_text('{"step": 28, "epoch": 1, "micro_batch": 13, "sched')
    (leftover / "model.safetensors").write_bytes(b"\x00" * 10)
    proc = train(setup, "full", run_dir, "--resume_from_checkpoint", "latest")
    assert f"{leftover}: ignoring a half-written checkpoint" in proc.stderr
    assert_same_run(run_dir, reference["full"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_resuming_from_it_matches(setup, reference, tmp_path, sig):
    run_dir = tmp_path / "run"
    at, code = interrupt(setup, "lora", run_dir, sig, random.Random(SEED + 1))
    output = (tmp_path / "run.log").read_text()
    assert code == 128 + sig, output
    assert "Traceback" not in output
    assert "--resume_from_checkpoint latest" in output.splitlines()[-1]
    # the checkpoint holds the last step the run finished, the one its log ends with
    newest = max(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
    assert newest == logged_steps(run_dir) >= at, f"seed {SEED}"
    train(setup, "lora", run_dir, "--resume_from_checkpoint", "latest")
    assert_same_run(run_dir, reference["lora"])


class _Payload:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_in_optimizer_file_is_refused_and_not_run(setup, killed, tmp_path):
    run_dir = copy_run(killed["full"], tmp_path / "run")
    marker = tmp_path / "PWNED"
    newest = max(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    with open(newest / "optimizer.pt", "wb") as handle:
        pickle.dump({"state": _Payload(marker), "param_groups": []}, handle)
    proc = run("ncal_core.train", [*setup["flags"]["full"], "--output_dir", run_dir,
                                   "--resume_from_checkpoint", "latest"], setup["env"])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    # the killed run may have left a half-written checkpoint, whose warning comes first
    assert errors == [proc.stderr.strip().splitlines()[-1]], proc.stderr
    assert f"{newest / 'optimizer.pt'}: refused: not a plain tensor file" in errors[0]
    assert not marker.exists()


def test_overwrite_output_dir_deletes_only_the_runs_own_checkpoints(setup, tmp_path):
    out = tmp_path / "out"
    outside = tmp_path / "precious"
    for path, text in {out / "notes.txt": "mine", out / "checkpoint-final" / "keep.txt": "mine",
                       out / "checkpoint-3" / "trainer_state.json": "{}", out / "metrics.jsonl": "{}\n",
                       out / ".tmp-checkpoint-checkpoint-5-1" / "x": "half", out / "ncal_run.json": "{}",
                       outside / "data.txt": "mine", outside / "trainer_state.json": "{}",
                       tmp_path / "sibling.txt": "mine",
                       tmp_path / "checkpoint-1" / "trainer_state.json": "{}"}.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    # a user's link that looks like the oldest checkpoint: neither starting over nor pruning may follow it
    (out / "checkpoint-0").symlink_to(outside, target_is_directory=True)
    flags = ["--dataset_path", setup["root"] / "train.jsonl", "--eval_dataset_path", "none", *TINY,
             "--max_steps", "3", "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "1",
             "--save_total_limit", "1", "--logging_steps", "1", "--output_dir", out]
    refused = run("ncal_core.train", flags, setup["env"])
    assert refused.returncode == 2 and "holds an earlier run" in refused.stderr
    proc = run("ncal_core.train", [*flags, "--overwrite_output_dir", "true"], setup["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / ".tmp-checkpoint-checkpoint-5-1").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0", "checkpoint-3", "checkpoint-final"]
    assert (out / "checkpoint-3" / "model.safetensors").is_file()  # the old checkpoint-3 went; this is the new one
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "checkpoint-final" / "keep.txt").read_text() == "mine"
    assert (out / "checkpoint-0").is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["data.txt", "trainer_state.json"]
    assert (tmp_path / "sibling.txt").read_text() == "mine"
    assert (tmp_path / "checkpoint-1" / "trainer_state.json").is_file()
    assert (out / "model.safetensors").is_file() and len(metrics(out)) == 3


def test_resume_with_another_lora_rank_is_refused_naming_the_flag_and_both_values(setup, killed, tmp_path):
    run_dir = copy_run(killed["lora"], tmp_path / "run")
    proc = run("ncal_core.train", [*setup["flags"]["lora"], "--output_dir", run_dir, "--lora_r", "4",
                                   "--resume_from_checkpoint", "latest"], setup["env"])
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --lora_r: the checkpoint") and "with 8, this run asks for 4" in last, last
    assert "Traceback" not in proc.stderr


def test_resume_with_another_global_batch_is_refused(setup, killed, tmp_path):
    run_dir = copy_run(killed["full"], tmp_path / "run")
    proc = run("ncal_core.train", [*setup["flags"]["full"], "--output_dir", run_dir,
                                   "--gradient_accumulation_steps", "2", "--resume_from_checkpoint", "latest"],
               setup["env"])
    assert proc.returncode == 2, proc.stderr
    assert "error: --per_device_train_batch_size (x processes x gradient_accumulation_steps): " \
           "the checkpoint" in proc.stderr and "with 4, this run asks for 8" in proc.stderr, proc.stderr


def test_resume_with_another_learning_rate_says_so_and_uses_it(setup, killed, tmp_path):
    run_dir = copy_run(killed["full"], tmp_path / "run")
    proc = train(setup, "full", run_dir, "--learning_rate", "5e-4", "--resume_from_checkpoint", "latest")
    assert "resuming with --learning_rate 0.0005 (the checkpoint's run had 0.001)" in proc.stdout, proc.stdout
    # linear decay to 0 at the last step: the step before it runs at 1/(steps - warm-up) of the new peak
    last_two = [r["lr"] for r in metrics(run_dir) if "lr" in r][-2:]
    assert last_two[1] == 0.0 and last_two[0] == pytest.approx(5e-4 / (STEPS - 2))


def _state(world: int | None):
    from ncal_core.train.state import TrainState
    return TrainState(step=2, run={"world_size": world} if world else None)


@pytest.mark.parametrize("saved, rng_keys", [
    (2, ["torch.rank0", "torch.rank1"]),   # recorded by the checkpoint
    (None, ["torch.rank0", "torch.rank1"]),  # older checkpoints: told by their per-rank RNG keys
])
def test_resume_on_another_number_of_processes_is_refused_naming_both(saved, rng_keys):
    from ncal_core.errors import NCALError
    from ncal_core.train.config import TrainConfig
    from ncal_core.train.resume import check_resume
    rng = {key: torch.zeros(4, dtype=torch.uint8) for key in rng_keys}
    with pytest.raises(NCALError, match=r"saved by 2 process\(es\), resumed with 1; resume with 2"):
        check_resume(TrainConfig(), 1, 1e-3, _state(saved), rng, Path("ckpt"))


def test_each_rank_takes_back_its_own_rng_and_a_lone_process_the_plain_keys():
    from ncal_core.train.resume import rank_rng
    saved = {f"{name}.rank{r}": torch.full((2,), 10 * r + i, dtype=torch.uint8)
             for r in range(2) for i, name in enumerate(["torch", "cuda0"])}
    assert {k: v.tolist() for k, v in rank_rng(saved, 1, 2).items()} == {"torch": [10, 10], "cuda0": [11, 11]}
    with pytest.raises(AssertionError):
        rank_rng(saved, 2, 3)  # world sizes are checked first: a missing rank is a bug, not a user error
    plain = {"torch": torch.zeros(2, dtype=torch.uint8), "cuda0": torch.ones(2, dtype=torch.uint8)}
    assert rank_rng(plain, 0, 1).keys() == plain.keys()


def test_gpu_rng_states_are_restored_in_device_order(monkeypatch):
    from ncal_core.train import resume
    given = []
    monkeypatch.setattr(resume.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(resume.torch.cuda, "set_rng_state_all", given.extend)
    state = {"torch": torch.get_rng_state(), **{f"cuda{i}": torch.full((1,), i, dtype=torch.uint8) for i in range(12)}}
    resume.set_rng_state(state)
    assert [int(t) for t in given] == list(range(12))  # cuda10 and cuda11 come after cuda9, not after cuda1
