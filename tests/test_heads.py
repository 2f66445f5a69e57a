"""Classification-head runs (--head linear / etf) end to end: trained, resumed, loaded by peft, exported for
transformers' text-classification pipeline, and read by infer, analyze and serve with one forward per batch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_with_tokenizer import make_checkpoint_with_tokenizer
from random_checkpoints import rel_err
from training_runs import (
    TINY,
    command_env,
    eval_report,
    final_weights,
    max_abs_diff,
    metrics,
    run,
    tmwpl_rows,
    write_jsonl,
)

from ncal_core.data.rows import Example
from ncal_core.evaluation.predictor import label_scorer, load_predictor
from ncal_core.model.classifier import QwenClassifier

FP32_REL = 1e-5   # class logits against transformers/peft, fp32
PROB_ATOL = 1e-5  # class probabilities of two of our paths that batch rows differently
RESUME_TOLERANCE = {"linear": 1e-6, "etf": 1e-5}  # etf: the temperature comes back from score.weight's row norms


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A LoRA linear-head run over a random Qwen2 and a fully fine-tuned etf-head run of the tiny model, each with a
    checkpoint every 2 steps and a development split choosing among them; post-hoc tau 0."""
    root = tmp_path_factory.mktemp("heads")
    base = make_checkpoint_with_tokenizer(root / "base", hidden_size=32, intermediate_size=64, layers=1, heads=2,
                                          kv_heads=1)
    env = command_env(root / "cache")
    common = ["--dataset_path", write_jsonl(root / "train.jsonl", tmwpl_rows(48)), "--eval_dataset_path",
              write_jsonl(root / "test.jsonl", tmwpl_rows(12, seed=1, prefix="t")), "--max_steps", "6",
              "--per_device_train_batch_size", "8", "--save_strategy", "steps", "--save_steps", "2",
              "--eval_strategy", "steps", "--eval_steps", "2", "--save_total_limit", "10", "--logging_steps", "1",
              "--logit_adjust_tau", "0", "--la_loss_tau", "1", "--learning_rate", "5e-3"]
    flags = {"linear": [*common, "--model_name_or_path", base, "--head", "linear", "--lora_dropout", "0.1"],
             "etf": [*common, *TINY, "--val_size", "0.25", "--head", "etf", "--lambda_lc", "1"]}
    out = {"root": root, "env": env, "base": base, "flags": flags}
    for kind, args in flags.items():
        out[kind] = root / kind
        result = run("ncal_core.train", [*args, "--output_dir", out[kind]], env)
        assert result.returncode == 0, result.stderr[-3000:]
    return out


def chat_prompts(tokenizer, texts: list[str]) -> list[str]:
    """The prompt text a run's rows are classified on: the chat template with its generation prompt."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          enable_thinking=False, tokenize=False) for t in texts]


TEXTS = [row["question"] for row in tmwpl_rows(6, seed=5, prefix="q")]


@pytest.mark.parametrize("kind", ["linear", "etf"])
def test_a_head_run_saves_transformers_formats(runs, kind):
    out = runs[kind]
    if kind == "linear":
        config = json.loads((out / "adapter_config.json").read_text())
        assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["score"])
    else:
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["Qwen2ForSequenceClassification"] and config["num_labels"] == 3
    lines = metrics(out)
    assert any(line.get("eval") == "step 2" for line in lines)  # the development split chose among checkpoints
    assert eval_report(out)["dev"]["rows"] > 0


def test_peft_loads_a_lora_head_run_with_its_logits(runs):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    predictor = load_predictor(runs["linear"])
    tokenizer = predictor.tokenizer
    hf = AutoModelForSequenceClassification.from_pretrained(runs["base"], num_labels=3,
                                                            pad_token_id=tokenizer.pad_token_id)
    reference = PeftModel.from_pretrained(hf, runs["linear"]).eval()
    batch = tokenizer(chat_prompts(tokenizer, TEXTS), return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        expected = reference(**batch).logits
        got, _ = predictor.classifier(batch["input_ids"], batch["attention_mask"].sum(1))
    assert rel_err(got, expected) <= FP32_REL


@pytest.mark.parametrize("kind", ["linear", "etf"])
def test_an_export_runs_in_the_text_classification_pipeline_with_infers_predictions(runs, kind):
    from transformers import pipeline

    root, env = runs["root"], runs["env"]
    exported = root / f"export-{kind}"
    result = run("ncal_core.export", ["--model_path", runs[kind], "--output_dir", exported, "--dtype", "float32"],
                 env)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"]
    assert config["id2label"] == {"0": "回忆", "1": "推断", "2": "识别"} and config["pad_token_id"] is not None
    rows = write_jsonl(root / f"rows-{kind}.jsonl", [{"id": str(i), "question": t} for i, t in enumerate(TEXTS)])
    predictions = {}
    for name, path in (("run", runs[kind]), ("export", exported)):
        out = root / f"{kind}-{name}.jsonl"
        result = run("ncal_core.infer", ["--model_path", path, "--prompts_file", rows, "--output_file", out], env)
        assert result.returncode == 0, result.stderr[-3000:]
        predictions[name] = [json.loads(line) for line in out.read_text().splitlines()]
    classify = pipeline("text-classification", model=str(exported), top_k=None)
    answers = classify(chat_prompts(classify.tokenizer, TEXTS))
    for ours, exported_row, theirs in zip(predictions["run"], predictions["export"], answers, strict=True):
        assert ours["prediction"] == exported_row["prediction"] == theirs[0]["label"]
        assert ours["scores"] == pytest.approx({a["label"]: a["score"] for a in theirs}, abs=PROB_ATOL)


@pytest.mark.parametrize("kind", ["linear", "etf"])
def test_infer_analyze_and_serve_read_a_head_run_with_one_forward_per_batch(runs, kind, tmp_path):
    from ncal_core.analyze import main as analyze
    from ncal_core.serve import Classifier, ServeConfig

    predictor = load_predictor(runs[kind])
    assert isinstance(predictor.classifier, QwenClassifier) and predictor.model.lm_head is None
    rows = tmwpl_rows(5, seed=2)
    examples = [Example(id=r["id"], messages=[{"role": "user", "content": r["question"]}], label=None,
                        where=r["id"]) for r in rows]
    calls = []
    predictor.model.register_forward_hook(lambda *_: calls.append(1))
    probs = label_scorer(predictor, predictor.labels, torch.zeros(3), batch_size=1)(examples).exp()
    assert len(calls) == len(examples)  # one forward a row at batch size 1: no K continuations
    served = Classifier(ServeConfig(model_path=str(runs[kind]), max_batch_size=4))([r["question"] for r in rows])
    for p, answer in zip(probs, served, strict=True):
        assert answer["scores"] == pytest.approx(dict(zip(predictor.labels, p.tolist())), abs=PROB_ATOL)
    data = write_jsonl(tmp_path / "rows.jsonl", tmwpl_rows(9, seed=3))
    assert analyze(["--model_path", str(runs[kind]), "--prompts_file", str(data), "--output_dir",
                    str(tmp_path / "analysis")]) == 0
    assert (tmp_path / "analysis" / "eval.json").is_file()


def without_paths(report: dict) -> dict:
    """eval.json without the folder the development split's best checkpoint was in (the runs' folders differ)."""
    report["dev"]["best_checkpoint"].pop("path")
    return report


@pytest.mark.parametrize("kind", ["linear", "etf"])
def test_a_head_run_resumed_from_a_checkpoint_ends_where_the_uninterrupted_run_does(runs, kind, tmp_path):
    resumed = shutil.copytree(runs[kind], tmp_path / "resumed")
    result = run("ncal_core.train", [*runs["flags"][kind], "--output_dir", resumed, "--resume_from_checkpoint",
                                     resumed / "checkpoint-2"], runs["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert max_abs_diff(final_weights(resumed), final_weights(runs[kind])) <= RESUME_TOLERANCE[kind]
    if kind == "linear":  # bit for bit: the adapter, the head and the RNG come back exactly
        assert metrics(resumed) == metrics(runs[kind])
        assert without_paths(eval_report(resumed)) == without_paths(eval_report(runs[kind]))


def test_a_head_flag_that_is_not_one_is_refused_naming_it(runs):
    result = run("ncal_core.train", [*runs["flags"]["etf"], "--output_dir", Path(runs["root"]) / "bad", "--head",
                                     "mlp"], runs["env"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --head: must be lm, linear or etf, not 'mlp'"


def test_generate_on_a_head_model_is_refused_in_one_line(runs, capsys):
    from ncal_core.errors import run_cli
    from ncal_core.infer import main as infer

    with pytest.raises(SystemExit) as exit_code:
        run_cli(infer, ["--model_path", str(runs["linear"]), "--prompt", "x", "--generate", "true"])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: --generate: {runs['linear']} is a classification head model, "
                                               "which generates no text; drop --generate")


def test_two_processes_train_a_head_as_one_process_does_at_the_same_global_batch(runs, tmp_path):
    from test_multiprocess import KEY_BIAS_ATOL, LOSS_RTOL, WEIGHT_ATOL, launch

    flags = [*runs["flags"]["etf"], "--head", "linear", "--save_strategy", "no", "--eval_strategy", "no"]
    single = run("ncal_core.train", [*flags, "--output_dir", tmp_path / "one"], runs["env"])
    assert single.returncode == 0, single.stderr[-3000:]
    double = launch([*flags, "--per_device_train_batch_size", "4", "--output_dir", tmp_path / "two"], runs["env"])
    assert double.returncode == 0, double.stderr[-5000:]
    lines_one, lines_two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(lines_one) == len(lines_two) >= 6
    for a, b in zip(lines_one, lines_two, strict=True):
        for key in ("loss", "lm_loss", "tc_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL, abs=1e-7), (a, b)
    w_one, w_two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert "score.weight" in w_one
    for key in w_one:
        assert max_abs_diff({key: w_one[key]}, {key: w_two[key]}) <= \
            (KEY_BIAS_ATOL if key.endswith("k_proj.bias") else WEIGHT_ATOL), key
