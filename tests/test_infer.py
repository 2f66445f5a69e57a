"""`python -m ncal_core.infer` end to end: probabilities against transformers, reports against scikit-learn."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import weakref

import pytest
import torch
from checkpoint_with_tokenizer import LABELS, TEXTS, make_checkpoint_with_tokenizer
from reference_scoring import chat_prompt_ids, reference_probabilities
from sklearn.metrics import accuracy_score, f1_score
from transformers import AutoModelForCausalLM

from ncal_core.data.rows import Example, load_examples
from ncal_core.errors import NCALError
from ncal_core.evaluation.generate import greedy_generate
from ncal_core.evaluation.predictor import label_scorer, load_folder, load_predictor, tau_offset
from ncal_core.infer import main
from ncal_core.model.tokenizer import load_tokenizer
from ncal_core.run_record import RunRecord

# fp32: probabilities of the same model computed two ways differ by accumulation order only
ATOL_FP32 = 1e-4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_checkpoint_with_tokenizer(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    rows = [{"id": f"r{i}", "question": text, "class": LABELS[i % len(LABELS)]} for i, text in enumerate(TEXTS[:9])]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path, rows


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _messages(rows):
    return [[{"role": "user", "content": r["question"]}] for r in rows]


def test_probabilities_and_metrics_of_a_base_checkpoint_match_transformers_and_sklearn(base, rows_file, tmp_path):
    path, rows = rows_file
    out, metrics = tmp_path / "p.jsonl", tmp_path / "m.json"
    assert main(["--model_path", str(base), "--prompts_file", str(path), "--output_file", str(out),
                 "--metrics_file", str(metrics), "--batch_size", "4"]) == 0
    predictions = _read_jsonl(out)
    labels = sorted(LABELS)  # a plain checkpoint records no label set: the sorted gold labels are used
    assert [p["id"] for p in predictions] == [r["id"] for r in rows]
    assert [p["label"] for p in predictions] == [r["class"] for r in rows]
    ours = torch.tensor([[p["scores"][label] for label in labels] for p in predictions])
    reference = reference_probabilities(AutoModelForCausalLM.from_pretrained(base).eval(), load_tokenizer(base),
                                        _messages(rows), labels)
    assert torch.allclose(ours, reference, atol=ATOL_FP32)
    assert [p["prediction"] for p in predictions] == [labels[i] for i in reference.argmax(1).tolist()]
    report = json.loads(metrics.read_text(encoding="utf-8"))
    gold = [r["class"] for r in rows]
    pred = [p["prediction"] for p in predictions]
    assert report["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert report["macro_f1"] == pytest.approx(f1_score(gold, pred, labels=labels, average="macro", zero_division=0))
    assert report["predict_seconds"] > 0  # the scoring alone, loading not counted


@pytest.mark.parametrize("suffix,delimiter", [(".csv", ","), (".tsv", "\t")])
def test_a_csv_or_tsv_output_file_holds_the_predictions_and_scores_of_the_jsonl_one(base, rows_file, tmp_path, suffix,
                                                                                     delimiter):
    written = {}
    for name in (".jsonl", suffix):
        written[name] = tmp_path / f"p{name}"
        assert main(["--model_path", str(base), "--prompts_file", str(rows_file[0]), "--output_file",
                     str(written[name])]) == 0
    predictions = _read_jsonl(written[".jsonl"])
    with open(written[suffix], encoding="utf-8", newline="") as handle:
        table = list(csv.DictReader(handle, delimiter=delimiter))
    labels = sorted(LABELS)
    assert list(table[0]) == ["id", "prediction", *(f"score:{label}" for label in labels), "label"]
    fields = ("id", "prediction", "label")
    assert [[row[k] for k in fields] for row in table] == [[p[k] for k in fields] for p in predictions]
    # a float cell is the float's repr, which reads back to the same float
    assert [{label: float(row[f"score:{label}"]) for label in labels} for row in table] == [p["scores"]
                                                                                           for p in predictions]


def test_a_generated_table_has_a_valid_column_and_an_empty_label_cell_for_no_gold_label(base, tmp_path):
    out = tmp_path / "g.csv"
    assert main(["--model_path", str(base), "--prompt", TEXTS[0], "--labels", ",".join(LABELS), "--generate", "true",
                 "--max_new_tokens", "3", "--output_file", str(out)]) == 0
    with open(out, encoding="utf-8", newline="") as handle:
        [row] = csv.DictReader(handle)
    assert list(row) == ["id", "prediction", "valid", "label"]
    assert row["id"] == "prompt" and row["valid"] == str(row["prediction"] in LABELS) and row["label"] == ""


def test_several_models_score_as_the_mean_of_their_label_log_probabilities(base, rows_file, tmp_path):
    other = make_checkpoint_with_tokenizer(tmp_path / "other", seed=1)
    path, rows = rows_file
    out = tmp_path / "p.jsonl"
    assert main(["--model_path", f"{base},{other}", "--prompts_file", str(path), "--output_file", str(out),
                 "--labels", ",".join(LABELS)]) == 0
    ours = torch.tensor([[p["scores"][label] for label in LABELS] for p in _read_jsonl(out)])
    each = [reference_probabilities(AutoModelForCausalLM.from_pretrained(folder).eval(), load_tokenizer(folder),
                                    _messages(rows), LABELS) for folder in (base, other)]
    reference = torch.softmax((each[0].log() + each[1].log()) / 2, dim=1)
    assert torch.allclose(ours, reference, atol=ATOL_FP32)
    # the two models disagree, so the ensemble is neither of them
    assert not torch.allclose(each[0], each[1], atol=1e-2)


def _recorded(folder, target, labels, counts):
    """A copy of `folder` with the label set and class counts a training run records."""
    shutil.copytree(folder, target)
    RunRecord(config={}, labels=labels, label_counts=counts).write(target)
    return target


def test_an_ensemble_adjusts_each_model_by_its_own_prior_and_holds_one_model_at_a_time(base, rows_file, tmp_path,
                                                                                       monkeypatch):
    other = make_checkpoint_with_tokenizer(tmp_path / "other", seed=1)
    counts = [50, 30, 15, 5][: len(LABELS)]
    first = _recorded(base, tmp_path / "first", LABELS, counts)
    # the same label set in another order, with other counts: scored by label name
    second = _recorded(other, tmp_path / "second", LABELS[::-1], [c * 2 + 1 for c in counts][::-1])
    loaded = []

    def load_one_at_a_time(folder, *args, **kwargs):
        assert all(ref() is None for ref in loaded), "the previous model is still in memory"
        predictor = load_folder(folder, *args, **kwargs)
        loaded.append(weakref.ref(predictor.model))
        return predictor

    monkeypatch.setattr("ncal_core.infer.load_folder", load_one_at_a_time)
    path, rows = rows_file
    out, tau = tmp_path / "p.jsonl", 0.7
    assert main(["--model_path", f"{first},{second}", "--prompts_file", str(path), "--output_file", str(out),
                 "--logit_adjust_tau", str(tau)]) == 0
    assert len(loaded) == 2
    ours = torch.tensor([[p["scores"][label] for label in LABELS] for p in _read_jsonl(out)])
    log_prior = [torch.tensor(c, dtype=torch.float64).div(sum(c)).log().float()
                 for c in (counts, [c * 2 + 1 for c in counts])]
    adjusted = [(reference_probabilities(AutoModelForCausalLM.from_pretrained(folder).eval(), load_tokenizer(folder),
                                         _messages(rows), LABELS).log() - tau * prior).log_softmax(1)
                for folder, prior in zip((base, other), log_prior)]
    assert torch.allclose(ours, torch.softmax((adjusted[0] + adjusted[1]) / 2, dim=1), atol=ATOL_FP32)


def test_an_ensemble_needs_one_label_set_and_is_checked_before_any_model_is_read(base, rows_file, tmp_path,
                                                                                 monkeypatch):
    first = _recorded(base, tmp_path / "first", LABELS, [1] * len(LABELS))
    other = _recorded(base, tmp_path / "other", ["甲", "乙"], [1, 1])
    monkeypatch.setattr("ncal_core.infer.load_folder", lambda *a, **k: pytest.fail("a model was read"))
    with pytest.raises(NCALError, match=re.escape(f"--model_path {other}: trained on the labels 甲,乙, not ")):
        main(["--model_path", f"{first},{other}", "--prompts_file", str(rows_file[0])])
    with pytest.raises(NCALError, match=re.escape(f"--model_path {tmp_path / 'missing'}: not a checkpoint folder, nor a hub id")):
        main(["--model_path", f"{first},{tmp_path / 'missing'}", "--prompts_file", str(rows_file[0])])
    (tmp_path / "empty").mkdir()
    with pytest.raises(NCALError, match=re.escape(f"--model_path {tmp_path / 'empty'}: neither a checkpoint")):
        main(["--model_path", f"{first},{tmp_path / 'empty'}", "--prompts_file", str(rows_file[0])])
    with pytest.raises(NCALError, match=re.escape(f"--logit_adjust_tau: {base} records no training class counts")):
        main(["--model_path", f"{first},{base}", "--prompts_file", str(rows_file[0]), "--logit_adjust_tau", "1"])


def test_adapter_saved_by_peft_works_over_its_base(base, rows_file, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                           task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    path, rows = rows_file
    out = tmp_path / "p.jsonl"
    assert main(["--model_path", str(tmp_path / "adapter"), "--base_model_path", str(base), "--prompts_file",
                 str(path), "--output_file", str(out), "--labels", ",".join(LABELS)]) == 0
    ours = torch.tensor([[p["scores"][label] for label in LABELS] for p in _read_jsonl(out)])
    reference = reference_probabilities(peft_model.eval(), load_tokenizer(base), _messages(rows), LABELS)
    assert torch.allclose(ours, reference, atol=ATOL_FP32)


def test_generate_equals_transformers_greedy_decoding_and_counts_invalid_outputs(base, rows_file, tmp_path,
                                                                                   capsys):
    path, rows = rows_file
    out = tmp_path / "g.jsonl"
    assert main(["--model_path", str(base), "--prompts_file", str(path), "--output_file", str(out),
                 "--generate", "true", "--max_new_tokens", "5"]) == 0
    generated = _read_jsonl(out)
    tokenizer = load_tokenizer(base)
    hf = AutoModelForCausalLM.from_pretrained(base).eval()
    for row, line in zip(rows, generated):
        prompt = torch.tensor([chat_prompt_ids(tokenizer, [{"role": "user", "content": row["question"]}])])
        ids = hf.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)[0, prompt.shape[1]:].tolist()
        if tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(tokenizer.eos_token_id)]
        assert line["prediction"] == tokenizer.decode(ids, skip_special_tokens=True).strip()
    invalid = sum(line["prediction"] not in LABELS for line in generated)
    assert f"{invalid} not a valid label" in capsys.readouterr().out


def test_single_prompt_and_interactive_print_label_and_probability(base, monkeypatch, capsys):
    labels = ",".join(LABELS)
    assert main(["--model_path", str(base), "--prompt", TEXTS[0], "--labels", labels]) == 0
    label, prob = capsys.readouterr().out.strip().split("\t")
    assert label in LABELS and 0 < float(prob) <= 1
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{TEXTS[1]}\n\n{TEXTS[2]}\n"))
    assert main(["--model_path", str(base), "--interactive", "true", "--labels", labels]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in LABELS for line in lines)


@pytest.mark.parametrize("argv,fragment", [
    (["--prompt", "x"], "--model_path is required"),
    (["--model_path", "MODEL", "--prompt", "x", "--prompts_file", "f"], "exactly one of"),
    (["--model_path", "/nonexistent", "--prompt", "x"], "--model_path /nonexistent: not a checkpoint folder, nor a hub id"),
    (["--model_path", "MODEL", "--prompt", "x"], "--labels"),
    (["--model_path", "MODEL", "--prompt", "x", "--labels", "a,b", "--metrics_file", "m.json"], "gold label"),
    (["--model_path", "MODEL,MODEL", "--interactive", "true", "--labels", "a,b"], "take one model"),
    (["--model_path", "MODEL,MODEL", "--prompt", "x", "--labels", "a,b", "--generate", "true"], "take one model"),
])
def test_bad_invocations_are_one_line_errors(base, argv, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NCALError) as err:
        main([a.replace("MODEL", str(base)) for a in argv])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_label_scores_on_the_models_device_get_the_prior_offset_moved_there(base, rows_file, tmp_path,
                                                                             monkeypatch):
    folder = _recorded(base, tmp_path / "run", LABELS, [50, 30, 5][: len(LABELS)])
    run = RunRecord.read(folder)
    predictor = load_predictor(folder)
    # label scores on another device than the CPU offset (meta: shapes only); adding a CPU [K] tensor raises
    monkeypatch.setattr("ncal_core.evaluation.predictor.score_labels", lambda model, prompts, label_ids, batch_size:
                        torch.zeros(len(prompts), len(label_ids), device="meta"))
    rows = load_examples(rows_file[0], require_labels=False)
    scorer = label_scorer(predictor, LABELS, tau_offset(1.5, str(folder), run, LABELS), batch_size=4)
    scores = scorer(rows)
    assert scores.device.type == "meta" and scores.shape == (len(rows), len(LABELS))


@pytest.mark.parametrize("as_list", [True, False])
def test_generate_stops_at_any_eos_of_generation_config(base, tmp_path, as_list):
    predictor = load_predictor(base)
    builder = predictor.prompt_builder(LABELS)
    example = Example(id="p", messages=[{"role": "user", "content": TEXTS[0]}], label=None, where="--prompt")
    first = greedy_generate(predictor.model, builder.prompt_ids(example), predictor.eos_ids, 5)
    assert len(first) > 1
    folder = shutil.copytree(base, tmp_path / "model")
    # the second generated token ends generation: the output is the first token alone
    eos = [predictor.tokenizer.eos_token_id, first[1]] if as_list else first[1]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}), encoding="utf-8")
    out = tmp_path / "g.jsonl"
    assert main(["--model_path", str(folder), "--prompt", TEXTS[0], "--labels", ",".join(LABELS), "--generate",
                 "true", "--max_new_tokens", "5", "--output_file", str(out)]) == 0
    expected = predictor.tokenizer.decode(first[:1], skip_special_tokens=True).strip()
    assert _read_jsonl(out)[0]["prediction"] == expected


@pytest.mark.parametrize("argv,fragment", [
    (["--dtype", "int8"], "--dtype: must be auto, float32"),
    (["--device", "gpu0"], "--device: not a device name"),
    (["--batch_size", "0"], "--batch_size: must be >= 1"),
    (["--max_new_tokens", "0"], "--max_new_tokens: must be >= 1"),
    (["--generate", "true", "--logit_adjust_tau", "1"], "--logit_adjust_tau: adjusts label scores"),
])
def test_infer_config_check_names_the_flag(base, argv, fragment):
    with pytest.raises(NCALError) as err:
        main(["--model_path", str(base), "--prompt", "x", "--labels", "a,b", *argv])
    assert fragment in str(err.value) and "\n" not in str(err.value)
