"""bench/reproduce.py --quick runs the whole comparison path end to end (it asserts nothing about who wins), and
reuses a finished run only while it was trained with the settings its method gives now."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.reproduce import delta_cell, main
from ncal_core.evaluation.tau_choice import TAU_GRID

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_reproduce_writes_the_table_json_and_plot(tmp_path, tmwpl_dir):
    env = {**os.environ, "NCAL_CACHE_DIR": str(tmp_path / "cache"), "NCAL_DATA_DIR": str(tmwpl_dir),
           "OMP_NUM_THREADS": "1"}

    def reproduce() -> str:
        return subprocess.run([sys.executable, "-m", "bench.reproduce", "--quick", "--out",
                               str(tmp_path / "out")], check=True, env=env, capture_output=True, cwd=REPO,
                              text=True).stdout

    reproduce()
    record = tmp_path / "out" / "runs" / "sft-s0" / "ncal_run.json"
    trained = record.stat().st_mtime_ns
    assert "training again" not in reproduce() and record.stat().st_mtime_ns == trained  # finished runs are reused
    recorded = json.loads(record.read_text())
    recorded["config"]["la_loss_tau"] = 1.0  # as if trained before a default changed
    record.write_text(json.dumps(recorded))
    assert "sft-s0: trained with other settings, training again: la_loss_tau 1.0 -> 0.0" in reproduce()
    assert json.loads(record.read_text())["config"]["la_loss_tau"] == 0.0
    record.write_text(json.dumps({"config": recorded["config"]}))  # as a run stopped part-way leaves it: flags only
    reproduce()
    assert json.loads(record.read_text())["config"]["seed"] == 0  # trained again to the end
    rows = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert [r["method"] for r in rows] == ["sft", "sft+LA", "ncal", "ncal+LA"]
    for row in rows:
        assert 0 <= row["macro_f1_mean"] <= 1 and 0 <= row["dev_macro_f1_mean"] <= 1 and len(row["tail_f1"]) == 3
    assert "delta_vs_sft" in rows[2] and rows[2]["twin"] == "sft" and "delta_vs_twin" in rows[2]
    table = (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    assert table.count("\n") == 2 + len(rows)
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 0
    assert all(len(row["train_seconds"]) == 1 and row["train_seconds"][0] > 0 for row in rows)
    short = subprocess.run([sys.executable, "-m", "bench.reproduce", "--table", str(tmp_path / "out")], check=True,
                           env=env, capture_output=True, cwd=REPO, text=True).stdout.splitlines()
    assert [line.split(" | ")[0] for line in short[2:]] == ["| `sft+LA`", "| `ncal+LA`"]  # adjusted rows only
    sft_la, ncal_la = rows[1], rows[3]
    assert short[2].endswith(f"| {sft_la['dev_macro_f1_mean']:.3f} | {sft_la['macro_f1_mean']:.3f} ± 0.000 | – | – |")
    assert short[3].endswith(f"| {delta_cell(ncal_la['delta_vs_sft'])} | {delta_cell(ncal_la['delta_vs_twin'])} |")


def test_table_of_a_folder_without_results_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--table", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"--table {tmp_path}: no results.json there" in capsys.readouterr().err


def test_settings_of_a_part_that_is_off_do_not_make_a_run_stale():
    from bench.reproduce import METHODS, PINNED, stale_settings
    from ncal_core.cli import parse_config
    from ncal_core.train.config import TrainConfig

    def recorded(method: str, *changed: str) -> dict:
        return vars(parse_config(TrainConfig, [*PINNED, *METHODS[method], *changed], "", "train"))

    sft = [*PINNED, *METHODS["sft"]]
    # an SFT run of the tiny model (full fine-tuning) trained under other TC and LoRA defaults is still SFT
    assert stale_settings(recorded("sft", "--lambda_lc", "0.1", "--pooling", "last", "--lora_dropout", "0"), sft) == {}
    assert stale_settings(recorded("sft", "--resample_epochs", "2"), sft) == {}  # no re-sampling to defer
    assert stale_settings(recorded("sft", "--la_loss_tau", "1"), sft) == {"la_loss_tau": (1.0, 0.0)}
    ncal = [*PINNED, *METHODS["ncal"]]
    assert stale_settings(recorded("ncal", "--pooling", "mean"), ncal) == {"pooling": ("mean", "last")}
    lora = ["--model_name_or_path", "some/checkpoint"]
    assert stale_settings(recorded("sft", *lora, "--lora_dropout", "0"), [*sft, *lora]) == {"lora_dropout": (0.0, 0.1)}


def test_sft_twin_is_the_method_that_trains_alike_with_tc_off():
    from bench.reproduce import sft_twin

    assert sft_twin("ncal") == sft_twin("ncal_mean_l1") == sft_twin("etf_target") == "sft"
    assert sft_twin("ncal_mean_l1_sqrt") == sft_twin("ncal_sqrt") == "sft_sqrt"
    assert sft_twin("ncal_la_loss") == "sft_la_loss" and sft_twin("ncal_drw") == "sft_drw"
    assert sft_twin("ncal_mean_l1_sqrt_e5") == "sft_sqrt_e5"
    assert sft_twin("ncal_mean_l1_sqrt_untied") == "sft_sqrt_untied"  # not sft_untied, which has no re-sampling
    assert sft_twin("ncal_mean_l1_sqrt_lr5e-4") is None  # no SFT run at that learning rate
    assert sft_twin("sft") is None and sft_twin("sft_sqrt") is None


def test_seed_ensembles_score_the_mean_label_log_probabilities_with_tau_from_dev(tmp_path):
    from sklearn.metrics import f1_score

    from bench.reproduce import summarise, write_table

    labels, counts = ["a", "b", "c"], [80, 15, 5]
    gen = torch.Generator().manual_seed(0)
    gold = {"dev": torch.arange(30) % 3, "test": torch.arange(60) % 3}
    prior = torch.tensor(counts, dtype=torch.float64).div(sum(counts)).log().float()

    def run(signal: float) -> dict:
        """Label scores right more often than not and leaning to the head class (as an unadjusted model's do),
        on a different scale per run."""
        res = {"labels": labels, "label_counts": counts}
        for split, g in gold.items():
            scores = torch.randn(len(g), 3, generator=gen) + signal * torch.nn.functional.one_hot(g, 3) + prior
            res[split] = {"scores": (scores * (1 + torch.rand(1, generator=gen)) - 5).tolist(), "gold": g.tolist()}
        return res

    results = {"sft": {s: run(1.0) for s in range(3)}, "ncal": {s: run(1.5) for s in range(3)}}
    rows = {row["method"]: row for row in summarise(results, Path("unused"))}

    def macro_f1(method: str, split: str, tau: float) -> float:
        mean = torch.stack([torch.tensor(r[split]["scores"]).log_softmax(1) for r in results[method].values()]).mean(0)
        return f1_score(gold[split], (mean - tau * prior).argmax(1), average="macro")

    def dev_tau(method: str) -> float:  # the first of TAU_GRID best on dev
        return TAU_GRID[max(range(len(TAU_GRID)), key=lambda i: (macro_f1(method, "dev", TAU_GRID[i]), -i))]

    for method in results:
        assert rows[method]["ensemble"]["tau"] == 0.0
        assert rows[method]["ensemble"]["macro_f1"] == pytest.approx(macro_f1(method, "test", 0.0))
        tau = dev_tau(method)
        assert rows[f"{method}+LA"]["ensemble"]["tau"] == tau > 0  # the balanced dev split undoes the lean
        assert rows[f"{method}+LA"]["ensemble"]["macro_f1"] == pytest.approx(macro_f1(method, "test", tau))
    assert rows["ncal+LA"]["twin"] == "sft+LA" and "delta_vs_twin" not in rows["sft+LA"]
    delta = macro_f1("ncal", "test", dev_tau("ncal")) - macro_f1("sft", "test", dev_tau("sft"))
    assert delta != 0 and rows["ncal+LA"]["ensemble"]["delta_vs_twin"][0] == pytest.approx(delta)
    write_table(list(rows.values()), tmp_path / "t.md")
    line = next(x for x in (tmp_path / "t.md").read_text().splitlines() if x.startswith("| ncal+LA |"))
    assert f"| {rows['ncal+LA']['ensemble']['macro_f1']:.3f} | {delta:+.3f} [" in line


@pytest.mark.slow
def test_with_model_lora_runs_train_on_a_long_tailed_fraction_and_zero_shot_scores_as_infer_does(tmp_path):
    from checkpoint_with_tokenizer import TEXTS, make_checkpoint_with_tokenizer
    from training_runs import command_env, write_jsonl

    from bench.reproduce import ZERO_SHOT_INSTRUCTION
    from ncal_core.infer import main as infer_main

    base = make_checkpoint_with_tokenizer(tmp_path / "base", hidden_size=32, intermediate_size=64, layers=1, heads=2,
                                          kv_heads=1)
    sizes = {"回忆": 40, "识别": 12, "推断": 8}
    train = [{"id": f"{label}{i}", "question": TEXTS[i % 6], "class": label}
             for label, n in sizes.items() for i in range(n)]
    write_jsonl(tmp_path / "train.jsonl", train)
    test = write_jsonl(tmp_path / "test.jsonl", [{"id": f"t{i}", "question": TEXTS[i % 6], "class": label}
                                                 for i, label in enumerate(list(sizes) * 3)])
    out = tmp_path / "out"

    def reproduce(methods: str = "zero_shot,sft,ncal", precision: str = "bf16") -> str:
        return subprocess.run([sys.executable, "-m", "bench.reproduce", "--model", str(base), "--train",
                               str(tmp_path / "train.jsonl"), "--test", str(test), "--train_fraction", "0.5",
                               "--dev_per_class", "2", "--methods", methods, "--seeds", "0", "--out", str(out),
                               "--precision", precision, "--", "--max_steps", "2", "--per_device_train_batch_size",
                               "4"],
                              check=True, env=command_env(tmp_path / "cache"), capture_output=True, cwd=REPO,
                              text=True).stdout

    reproduce()
    subset = [json.loads(line) for line in (out / "train_f0.5.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {label: sum(r["class"] == label for r in subset) for label in sizes} == {"回忆": 20, "识别": 6, "推断": 4}
    assert all(r in train for r in subset)  # rows of the training file, as they were
    config = json.loads((out / "runs" / "sft-s0" / "ncal_run.json").read_text())["config"]
    assert {k: config[k] for k in ("model_name_or_path", "use_lora", "lora_r", "lora_alpha", "target_modules",
                                   "learning_rate", "dataset_path", "num_train_epochs", "dev_per_class", "bf16",
                                   "torch_dtype")} == {
        "model_name_or_path": str(base), "use_lora": True, "lora_r": 8, "lora_alpha": 32.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "learning_rate": 2e-4,
        "dataset_path": str(out / "train_f0.5.jsonl"), "num_train_epochs": 2.0, "dev_per_class": 2, "bf16": True,
        "torch_dtype": "bfloat16"}  # the default --precision bf16

    cache = out / "runs" / "zero_shot" / "scores.json"
    zero_shot = json.loads(cache.read_text(encoding="utf-8"))
    record = json.loads((out / "runs" / "sft-s0" / "ncal_run.json").read_text())
    assert zero_shot["instruction"] == ZERO_SHOT_INSTRUCTION and zero_shot["checkpoint"] == str(base)
    assert zero_shot["dev_ids"] == json.loads((out / "runs" / "sft-s0" / "dev_ids.json").read_text())
    assert zero_shot["test_ids"] == [f"t{i}" for i in range(9)]
    assert zero_shot["label_counts"] == record["label_counts"] and zero_shot["labels"] == record["labels"]
    predictions = tmp_path / "zero_shot.jsonl"
    assert infer_main(["--model_path", str(base), "--prompts_file", str(test), "--instruction", ZERO_SHOT_INSTRUCTION,
                       "--output_file", str(predictions)]) == 0
    expected = [[row["scores"][label] for label in zero_shot["labels"]]
                for row in map(json.loads, predictions.read_text(encoding="utf-8").splitlines())]
    assert torch.allclose(torch.tensor(zero_shot["test"]["scores"]).softmax(1), torch.tensor(expected), atol=1e-5)

    rows = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [r["method"] for r in rows] == ["zero_shot", "zero_shot+LA", "sft", "sft+LA", "ncal", "ncal+LA"]
    assert "delta_vs_sft" in rows[0] and "twin" not in rows[0] and rows[4]["twin"] == "sft"
    scored = cache.stat().st_mtime_ns
    assert "training again" not in reproduce() and cache.stat().st_mtime_ns == scored  # all of it reused
    retrained = reproduce("sft", "fp32")
    assert "training again" in retrained and "bf16 True -> False" in retrained
    assert "torch_dtype 'bfloat16' -> 'float32'" in retrained
