"""--load_best_model_at_end: when an earlier checkpoint beat the final weights on the development split, the run
ends with that checkpoint's weights: they are saved as the output, scored on the test rows (checked against the
checkpoint scored on its own through the predictor) and carry the tau that split chose for them.

Which evaluation wins is forced: the development split's weighted macro-F1 the loop sees is replaced by a falling
sequence (epoch 1 best), so the choice does not hang on what a few steps of a tiny model happen to learn.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sklearn.metrics import confusion_matrix
from training_runs import TINY, eval_report, final_weights, max_abs_diff, tmwpl_rows, write_jsonl

import ncal_core.train.loop as loop
from ncal_core.cli import parse_config
from ncal_core.data.prompts import PromptBuilder
from ncal_core.data.rows import load_examples
from ncal_core.evaluation.predictor import load_predictor
from ncal_core.evaluation.scoring import score_labels
from ncal_core.loss.logit_adjustment import adjust_scores, log_prior
from ncal_core.run_record import RunRecord
from ncal_core.train.checkpoint import list_checkpoints
from ncal_core.train.config import TrainConfig

pytestmark = pytest.mark.slow


@pytest.fixture
def epoch_one_best(monkeypatch) -> list[str]:
    """Development evaluations score 0.9, 0.5, 0.4, 0.3 in turn; returns the tags of those evaluations."""
    real, tags = loop.run_eval, []

    def falling(run, log, rows, split, tag, tau):
        report, features = real(run, log, rows, split, tag, tau)
        if split == "dev":
            tags.append(tag)
            report["weighted_macro_f1"] = [0.9, 0.5, 0.4, 0.3][len(tags) - 1]
        return report, features

    monkeypatch.setattr(loop, "run_eval", falling)
    return tags


def _train(tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "out"
    train = write_jsonl(tmp_path / "train.jsonl", tmwpl_rows(36))
    test = write_jsonl(tmp_path / "test.jsonl", tmwpl_rows(18, seed=1, prefix="t"))
    loop.train(parse_config(TrainConfig, [*TINY, "--dataset_path", str(train), "--eval_dataset_path", str(test),
                                          "--output_dir", str(out), "--val_size", "9", "--num_train_epochs", "3",
                                          "--per_device_train_batch_size", "9", "--learning_rate", "5e-3",
                                          "--logging_steps", "1", *extra], description="", prog="train"))
    return out


def _test_confusion(folder: Path, test_file: Path, tau: float) -> list[list[int]]:
    """The test rows scored by the weights in folder through the predictor, with post-hoc adjustment by tau."""
    predictor = load_predictor(folder)
    builder = PromptBuilder(predictor.tokenizer, predictor.labels, cutoff_len=predictor.cutoff_len)
    rows = load_examples(test_file)
    scores = score_labels(predictor.model, [builder.prompt_ids(r) for r in rows], builder.label_ids)
    prior = log_prior(RunRecord.read(folder).label_counts)
    predicted = adjust_scores(scores, prior, tau).argmax(1).tolist()
    gold = [predictor.labels.index(r.label) for r in rows]
    return confusion_matrix(gold, predicted, labels=range(len(predictor.labels))).tolist()


@pytest.mark.parametrize("use_lora", ["false", "true"])
def test_the_run_ends_with_the_checkpoint_the_development_split_chose(tmp_path, monkeypatch, epoch_one_best,
                                                                       use_lora):
    monkeypatch.setenv("NCAL_CACHE_DIR", str(tmp_path / "cache"))
    out = _train(tmp_path, "--use_lora", use_lora)
    first, *_, last = list_checkpoints(out)
    assert epoch_one_best == ["epoch 1", "epoch 2", "final", f"best: {first.name}"]
    report = eval_report(out)
    assert report["dev"]["weights_from"] == report["dev"]["best_checkpoint"]["path"] == str(first)
    assert max_abs_diff(final_weights(out), final_weights(first)) == 0
    assert max_abs_diff(final_weights(last), final_weights(first)) > 0  # the final weights were other weights
    # the tau the development split chose for these weights, then and now, is what the output carries
    tau = RunRecord.read(out).logit_adjust_tau
    assert tau == RunRecord.read(first).logit_adjust_tau == report["logit_adjust_tau"] == report["dev"][
        "logit_adjust_tau"]
    assert report["confusion"] == _test_confusion(first, tmp_path / "test.jsonl", tau)
    assert report["confusion"] == _test_confusion(out, tmp_path / "test.jsonl", tau)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["eval"] for x in lines if "eval" in x][-2:] == [f"best: {first.name}", "final"]  # dev, then test


def test_without_load_best_the_final_weights_stay(tmp_path, monkeypatch, epoch_one_best):
    monkeypatch.setenv("NCAL_CACHE_DIR", str(tmp_path / "cache"))
    out = _train(tmp_path, "--load_best_model_at_end", "false")
    first, *_, last = list_checkpoints(out)
    report = eval_report(out)
    assert report["dev"]["weights_from"] == "final" and report["dev"]["best_checkpoint"]["path"] == str(first)
    assert max_abs_diff(final_weights(out), final_weights(last)) == 0
    assert epoch_one_best == ["epoch 1", "epoch 2", "final"]


def test_a_chosen_checkpoint_that_was_not_kept_is_said_and_the_final_weights_stay(tmp_path, monkeypatch, capsys,
                                                                                  epoch_one_best):
    monkeypatch.setenv("NCAL_CACHE_DIR", str(tmp_path / "cache"))
    out = _train(tmp_path, "--save_strategy", "no")
    assert not list_checkpoints(out)
    assert eval_report(out)["dev"]["weights_from"] == "final"
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("the development split chose")]
    assert len(said) == 1 and "checkpoint-" in said[0] and "--save_strategy no" in said[0]
