"""The training loop reaches the same losses through its alternative paths: the fused Triton TC kernels
(interpreted on CPU) against PyTorch, and the padding-free decoder against one padded batch."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ncal_core.run_record import RunRecord

# fp32 losses of 4 steps: the two paths differ by summation order (and matrix shapes) only
RTOL_LOSS = 1e-4


def _rows(path: Path) -> Path:
    """48 rows of three classes and varied lengths."""
    words = ["苹果", "三角形", "面积", "分数", "速度", "长方形", "周长", "小数"]
    rows = [{"id": str(i), "question": f"{words[i % 8]}和{words[(i * 3) % 8]}的问题{i}" + "很长" * (i % 7) * 6,
             "class": "ABC"[i % 3]} for i in range(48)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _losses(tmp_path: Path, name: str, flags: list[str]) -> list[tuple[float, float]]:
    """(LM loss, TC loss) of each of 4 steps of a tiny run with `flags`."""
    out = tmp_path / name
    env = {**os.environ, "NCAL_CACHE_DIR": str(tmp_path / "cache"), "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-m", "ncal_core.train", "--dataset_path", str(_rows(tmp_path / "rows.jsonl")),
                    "--output_dir", str(out), "--eval_dataset_path", "none", "--save_strategy", "no",
                    "--max_steps", "4", "--logging_steps", "1", "--per_device_train_batch_size", "12",
                    "--lambda_lc", "1", "--tiny_hidden_size", "64", "--tiny_num_layers", "1",
                    "--tiny_vocab_size", "300", *flags], check=True, env=env, capture_output=True)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(x["lm_loss"], x["tc_loss"]) for x in lines if "lm_loss" in x]


def _assert_same(first: list[tuple[float, float]], second: list[tuple[float, float]]) -> None:
    assert len(first) == len(second) == 4
    assert first[0][1] > 0  # the TC term is really there
    for (lm_a, tc_a), (lm_b, tc_b) in zip(first, second):
        assert lm_b == pytest.approx(lm_a, rel=RTOL_LOSS) and tc_b == pytest.approx(tc_a, rel=RTOL_LOSS)


@pytest.mark.slow
def test_fused_triton_tc_path_trains_to_the_same_losses_as_pytorch(tmp_path):
    _assert_same(_losses(tmp_path, "torch", ["--tc_backend", "torch"]),
                 _losses(tmp_path, "triton", ["--tc_backend", "triton"]))


@pytest.mark.slow
def test_padding_free_trains_to_the_losses_of_one_padded_batch(tmp_path):
    # logit-adjusted loss on too: it reads each row's first-label logits and class id, which attention blocks
    # reorder (rows sorted longest-first)
    common = ["--la_loss_tau", "1", "--tc_backend", "torch"]
    _assert_same(_losses(tmp_path, "padded", [*common, "--padding_free", "false"]),
                 _losses(tmp_path, "free", [*common, "--padding_free", "true"]))


@pytest.mark.slow
def test_an_adapter_records_its_base_as_an_absolute_path(tmp_path):
    """Trained from a relative --model_name_or_path, the adapter still finds its base when read from elsewhere."""
    from checkpoint_with_tokenizer import make_checkpoint_with_tokenizer
    make_checkpoint_with_tokenizer(tmp_path / "models" / "base", hidden_size=32, intermediate_size=64, layers=1,
                                   heads=2, kv_heads=1)
    env = {**os.environ, "NCAL_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "ncal_core.train", "--dataset_path", str(_rows(tmp_path / "rows.jsonl")),
                    "--model_name_or_path", "models/base", "--output_dir", "run", "--eval_dataset_path", "none",
                    "--save_strategy", "no", "--max_steps", "1", "--per_device_train_batch_size", "12"],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
    recorded = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((tmp_path / "models" / "base").resolve())
    assert json.loads((tmp_path / "run" / "ncal_run.json").read_text())["base_model"] == recorded


def _tiny_run(tmp_path: Path, rows_name: str, *flags: str) -> str:
    """stdout of a one-step run of the built-in tiny model on rows saved as `rows_name`."""
    env = {**os.environ, "NCAL_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "ncal_core.train", "--dataset_path",
                           str(_rows(tmp_path / rows_name)), "--output_dir", str(tmp_path / "out"),
                           "--overwrite_output_dir", "true", "--eval_dataset_path", "none", "--save_strategy", "no",
                           "--max_steps", "1", "--per_device_train_batch_size", "12", "--tiny_hidden_size", "32",
                           "--tiny_num_layers", "1", "--tiny_vocab_size", "300", *flags],
                          check=True, env=env, capture_output=True, text=True).stdout


@pytest.mark.slow
def test_forgetting_the_model_flag_says_that_the_built_in_tiny_model_is_trained(tmp_path):
    note = "note: training the built-in tiny model from scratch (no --model_name_or_path given)"
    assert note in _tiny_run(tmp_path, "tmwpl_rows.jsonl", "--bf16", "true")       # flags of a real model
    assert note in _tiny_run(tmp_path, "my_rows.jsonl")                            # data that is not TMWPL
    assert note not in _tiny_run(tmp_path, "tmwpl_rows.jsonl")                     # the main job's own setting


@pytest.mark.slow
def test_lora_trains_under_bf16_autocast(tmp_path):
    # --bf16 on a fp32 base with adapters, as on a GPU: LoRA's own backward meets bf16 gradients and fp32 factors
    out = _tiny_run(tmp_path, "tmwpl_rows.jsonl", "--bf16", "true", "--use_lora", "true", "--lora_dropout", "0.1")
    assert any(line.startswith("model:      tiny (LoRA") for line in out.splitlines()), out


@pytest.mark.slow
def test_a_run_says_what_it_will_do_and_what_it_wrote(tmp_path):
    out = _tiny_run(tmp_path, "tmwpl_rows.jsonl").splitlines()
    # --val_size 0.1 by default: 2 of each class's 16 rows held out
    assert any(line.startswith("data:       42 training rows of ") and line.endswith("3 classes: A 14, B 14, C 14")
               for line in out), out
    assert "dev split:  6 rows held out of training, evaluated to choose the best checkpoint" in out
    assert "tau:        post-hoc logit adjustment chosen on the dev split" in out
    assert "evaluation: no test (no evaluation file; pass --eval_dataset_path to score one)" in out
    assert any(line.startswith("model:      tiny (full fine-tuning), ") and " trainable of " in line for line in out)
    assert "plan:       1 optimizer steps of 12 rows (12 per process x 1 process(es) x 1 accumulation)" in out
    wrote = [line for line in out if line.startswith(f"wrote {tmp_path / 'out'}: ")]
    assert len(wrote) == 1 and "model.safetensors" in wrote[0] and "metrics.jsonl" in wrote[0], out


@pytest.mark.slow
def test_the_best_checkpoint_is_chosen_on_the_dev_split_and_the_test_file_is_scored_once(tmp_path):
    rows = _rows(tmp_path / "train.jsonl")
    test = tmp_path / "test.jsonl"
    test.write_text(rows.read_text(encoding="utf-8").replace('"id": "', '"id": "t'), encoding="utf-8")
    out = tmp_path / "out"
    env = {**os.environ, "NCAL_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-m", "ncal_core.train", "--dataset_path", str(rows), "--eval_dataset_path",
                    str(test), "--output_dir", str(out), "--num_train_epochs", "3", "--per_device_train_batch_size",
                    "12", "--tiny_hidden_size", "32", "--tiny_num_layers", "1", "--tiny_vocab_size", "300",
                    "--val_size", "0.25"], check=True, env=env, capture_output=True, text=True)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    evals = [(r["eval"], r["split"], r["rows"]) for r in lines if "eval" in r]
    dev_lines = [r for r in lines if r.get("split") == "dev"]
    # chosen by the balanced (class-weighted) macro-F1, at the tau each evaluation chose on dev; a tie keeps the earlier
    best = max(dev_lines[:3], key=lambda r: r["eval_weighted_macro_f1"])
    path = out if best["eval"] == "final" else out / f"checkpoint-{best['step']}"
    # 12 of 48 rows held out (4 a class); epochs 1 and 2 on dev, the final weights on dev, an earlier checkpoint that
    # beat them loaded back and scored on dev again, then the test rows once
    restored = [] if path == out else [(f"best: {path.name}", "dev", 12)]
    assert evals == [("epoch 1", "dev", 12), ("epoch 2", "dev", 12), ("final", "dev", 12), *restored,
                     ("final", "test", 48)]
    report = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    final_test = next(r for r in lines if r.get("split") == "test")
    assert report["macro_f1"] == final_test["eval_macro_f1"] and report["dev"]["rows"] == 12
    assert report["dev"]["best_checkpoint"] == {"path": str(path), "macro_f1": best["eval_weighted_macro_f1"]}
    assert report["dev"]["weights_from"] == ("final" if path == out else str(path))
    # the test rows are scored at the tau the scored weights' dev evaluation chose: the smallest of the grid's best
    scored_dev = dev_lines[-1]
    assert scored_dev["eval_weighted_macro_f1"] == best["eval_weighted_macro_f1"]
    by_tau = report["dev"]["tau_chosen_on_these_rows"]
    tau = scored_dev["logit_adjust_tau"]
    assert by_tau[str(tau)] == max(by_tau.values()) and all(v < by_tau[str(tau)] for t, v in by_tau.items()
                                                            if float(t) < tau)
    assert report["logit_adjust_tau"] == final_test["logit_adjust_tau"] == report["dev"]["logit_adjust_tau"] == tau
    assert RunRecord.read(out).logit_adjust_tau == tau  # what infer, analyze, export and serve apply
    dev_ids = set(json.loads((out / "dev_ids.json").read_text(encoding="utf-8")))
    assert len(dev_ids) == 12 and not dev_ids & {f"t{i}" for i in range(48)}


@pytest.mark.slow
def test_step_evaluation_scores_the_dev_split_every_eval_steps(tmp_path):
    rows = _rows(tmp_path / "train.jsonl")
    out = tmp_path / "out"
    env = {**os.environ, "NCAL_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-m", "ncal_core.train", "--dataset_path", str(rows), "--eval_dataset_path",
                    "none", "--output_dir", str(out), "--max_steps", "5", "--per_device_train_batch_size", "12",
                    "--tiny_hidden_size", "32", "--tiny_num_layers", "1", "--tiny_vocab_size", "300",
                    "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "no"],
                   check=True, env=env, capture_output=True, text=True)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["step"], r["eval"], r["split"]) for r in lines if "eval" in r] == [
        (2, "step 2", "dev"), (4, "step 4", "dev"), (5, "final", "dev")]
    assert not list(out.glob("checkpoint-*"))  # --save_strategy no: the best is chosen, nothing is saved


def _tracked_run(tmp_path: Path, report_to: str, **env: str) -> tuple[Path, list[dict]]:
    """(output folder, metrics.jsonl lines) of 4 logged steps and 2 development evaluations with --report_to."""
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "ncal_core.train", "--dataset_path", str(_rows(tmp_path / "train.jsonl")),
                    "--eval_dataset_path", "none", "--output_dir", str(out), "--max_steps", "4", "--logging_steps", "1",
                    "--per_device_train_batch_size", "12", "--tiny_hidden_size", "32", "--tiny_num_layers", "1",
                    "--tiny_vocab_size", "300", "--save_strategy", "no", "--report_to", report_to], check=True,
                   env={**os.environ, "NCAL_CACHE_DIR": str(tmp_path / "cache"), **env}, capture_output=True, text=True)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return out, lines


@pytest.mark.slow
def test_report_to_tensorboard_logs_what_metrics_jsonl_logs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, lines = _tracked_run(tmp_path, "tensorboard")
    (run_dir,) = (out / "runs").iterdir()
    events = EventAccumulator(str(run_dir)).Reload()
    logged = {(e.step, round(e.value, 5)) for e in events.Scalars("train/loss")}
    assert logged == {(r["step"], round(r["loss"], 5)) for r in lines if "loss" in r} and len(logged) == 4
    dev = [(r["step"], round(r["eval_macro_f1"], 5)) for r in lines if r.get("split") == "dev"]
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("dev/macro_f1")] == dev and len(dev) == 2


# a .wandb file: a 7-byte header, then LevelDB's log format, 32 KiB blocks of chunks
# (crc32c: 4 bytes, length: 2 little-endian, type: 1, data); a chunk of type FULL or LAST ends a record
WANDB_HEADER, WANDB_BLOCK, CHUNK_HEADER, RECORD_ENDS = 7, 32768, 7, (1, 4)


def _wandb_records(path: Path) -> list:
    """The protobuf records of an offline wandb run's transaction log, in the order they were written."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data.startswith(b":W&B"), path
    records, pending, pos = [], b"", WANDB_HEADER
    while pos + CHUNK_HEADER <= len(data):
        if WANDB_BLOCK - pos % WANDB_BLOCK < CHUNK_HEADER:  # a block's tail too short for a chunk is padding
            pos += WANDB_BLOCK - pos % WANDB_BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind in RECORD_ENDS:
            records.append(Record.FromString(pending))
            pending = b""
    return records


def _wandb_items(items) -> dict:
    """A config, history or summary record's items as {key: value}."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def _wandb_latest(records: list, kind: str) -> dict:
    """A run's config or summary: each key's value in the last `kind` record that sets it."""
    latest = {}
    for record in records:
        if record.HasField(kind):
            latest.update(_wandb_items(getattr(record, kind).update))
    return latest


@pytest.mark.slow
def test_report_to_wandb_offline_logs_the_flags_and_what_metrics_jsonl_logs(tmp_path):
    pytest.importorskip("wandb")
    from ncal_core.train.config import TrainConfig

    out, lines = _tracked_run(tmp_path, "wandb", WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true",
                                WANDB_CACHE_DIR=str(tmp_path / "cache"), WANDB_CONFIG_DIR=str(tmp_path / "config"))
    (log,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = _wandb_records(log)
    config = _wandb_latest(records, "config")
    assert {field.name for field in dataclasses.fields(TrainConfig)} <= set(config)
    assert config["max_steps"] == 4 and config["report_to"] == "wandb" and config["output_dir"] == str(out)
    history = [_wandb_items(record.history.item) for record in records if record.HasField("history")]
    steps = [r for r in lines if "loss" in r]
    assert [(h["_step"], h["train/loss"]) for h in history] == [(r["step"], r["loss"]) for r in steps]
    dev = [(r["step"], r["eval_macro_f1"]) for r in lines if r.get("split") == "dev"]
    assert [(h["_step"], h["dev/macro_f1"]) for h in history if "dev/macro_f1" in h] == dev and len(dev) == 2
    summary = _wandb_latest(records, "summary")
    assert summary["train/loss"] == steps[-1]["loss"] and summary["dev/macro_f1"] == dev[-1][1]


def test_report_to_a_tracker_that_is_not_installed_is_refused_in_one_line(monkeypatch):
    import importlib.util

    from ncal_core.errors import NCALError
    from ncal_core.train.config import TrainConfig

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else found(name, *a))
    with pytest.raises(NCALError, match=r"^--report_to: wandb is not installed \(pip install wandb\)$"):
        TrainConfig(report_to="wandb").check()


@pytest.mark.slow
def test_training_reads_a_csv_file_by_its_columns(tmp_path):
    rows = [json.loads(line) for line in _rows(tmp_path / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
    csv = tmp_path / "train.csv"
    csv.write_text("category,body\n" + "".join(f"{r['class']},\"{r['question']}\"\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    env = {**os.environ, "NCAL_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "ncal_core.train", "--dataset_path", str(csv), "--text_column",
                          "body", "--label_column", "category", "--eval_dataset_path", "none", "--output_dir",
                          str(out), "--max_steps", "1", "--per_device_train_batch_size", "12", "--tiny_hidden_size",
                          "32", "--tiny_num_layers", "1", "--tiny_vocab_size", "300", "--save_strategy", "no"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "data:       42 training rows of " in run.stdout and "3 classes: A 14, B 14, C 14" in run.stdout
    record = json.loads((out / "ncal_run.json").read_text(encoding="utf-8"))
    assert record["labels"] == ["A", "B", "C"] and record["config"]["text_column"] == "body"
