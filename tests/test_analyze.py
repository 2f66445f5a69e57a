"""`python -m ncal_core.analyze` and `python -m ncal_core.infer` score a training output as its own evaluation did."""

from __future__ import annotations

import json

import pytest
from training_runs import LABELS, TINY, eval_report, tmwpl_rows, write_jsonl

from ncal_core import analyze, infer
from ncal_core.errors import NCALError
from ncal_core.train import loop as train


@pytest.fixture(scope="module")
def long_tailed_run(tmp_path_factory):
    """A tiny run trained briefly on long-tailed rows (24/8/3), evaluated with its default tau 1.5."""
    root = tmp_path_factory.mktemp("run")
    pool = tmwpl_rows(120)
    rows = [r for label, n in zip(LABELS, (24, 8, 3)) for r in [r for r in pool if r["class"] == label][:n]]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "test.jsonl", tmwpl_rows(30, seed=1, prefix="t"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NCAL_CACHE_DIR", str(root / "cache"))
        assert train.main(["--dataset_path", str(root / "train.jsonl"), "--eval_dataset_path", str(root / "test.jsonl"),
                           "--output_dir", str(root / "out"), *TINY, "--val_size", "0.1",  # the default split
                           "--max_steps", "80", "--learning_rate", "5e-3",
                           "--per_device_train_batch_size", "8", "--save_strategy", "no", "--eval_strategy", "no"]) == 0
    return root


@pytest.mark.slow
def test_train_infer_and_analyze_give_one_macro_f1_with_the_runs_tau(long_tailed_run, capsys):
    root = long_tailed_run
    run_report = eval_report(root / "out")
    assert run_report["logit_adjust_tau"] == 1.5
    # the adjustment changes the predictions, so scoring without it could not give the same figure
    assert run_report["macro_f1"] != run_report["unadjusted"]["macro_f1"]
    assert infer.main(["--model_path", str(root / "out"), "--prompts_file", str(root / "test.jsonl"),
                       "--metrics_file", str(root / "infer.json"), "--output_file", str(root / "preds.jsonl")]) == 0
    assert analyze.main(["--model_path", str(root / "out"), "--prompts_file", str(root / "test.jsonl"),
                         "--output_dir", str(root / "analysis")]) == 0
    infer_report = json.loads((root / "infer.json").read_text(encoding="utf-8"))
    analyze_report = eval_report(root / "analysis")
    for report in (infer_report, analyze_report):
        assert report["macro_f1"] == pytest.approx(run_report["macro_f1"])
        assert report["accuracy"] == pytest.approx(run_report["accuracy"])
        assert report["logit_adjust_tau"] == 1.5
    said = capsys.readouterr()
    assert "logit_adjust_tau 1.5 (the training run's" in said.err
    assert f"wrote the report to {root / 'infer.json'}" in said.err
    assert f"wrote 30 predictions to {root / 'preds.jsonl'}" in said.err
    assert any(line.startswith(f"wrote {root / 'analysis'}: ") and "eval.json" in line and "sphere.png" in line
               for line in said.out.splitlines()), said.out


def test_a_tau_given_overrides_the_runs(long_tailed_run):
    root = long_tailed_run
    assert analyze.main(["--model_path", str(root / "out"), "--prompts_file", str(root / "test.jsonl"),
                         "--output_dir", str(root / "plain"), "--logit_adjust_tau", "0"]) == 0
    report = eval_report(root / "plain")
    assert report["logit_adjust_tau"] == 0
    assert report["macro_f1"] == pytest.approx(eval_report(root / "out")["unadjusted"]["macro_f1"])


@pytest.mark.parametrize("argv,fragment", [
    (["--prompts_file", "f", "--output_dir", "o"], "--model_path is required"),
    (["--model_path", "m", "--prompts_file", "f", "--output_dir", "o", "--pooling", "max"], "--pooling: must be"),
    (["--model_path", "m", "--prompts_file", "f", "--output_dir", "o", "--batch_size", "0"], "--batch_size: must be"),
    (["--model_path", "m", "--prompts_file", "f", "--output_dir", "o", "--dtype", "int8"], "--dtype: must be"),
    (["--model_path", "m", "--prompts_file", "f", "--output_dir", "o", "--device", "gpu0"], "--device: not a device"),
])
def test_bad_flags_are_one_line_errors_naming_the_flag(argv, fragment):
    with pytest.raises(NCALError) as err:
        analyze.main(argv)
    assert fragment in str(err.value) and "\n" not in str(err.value)
