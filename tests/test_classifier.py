"""The classification head (model.classifier) against transformers' Qwen2/Qwen3ForSequenceClassification on random
checkpoints, the simplex-ETF head, and the SEQ_CLS adapter format against peft."""

from __future__ import annotations

import json

import pytest
import torch
from random_checkpoints import make_hf_checkpoint, randomise_lora_b, rel_err
from safetensors.torch import load_file

from ncal_core.errors import NCALError
from ncal_core.evaluation.classify import classify
from ncal_core.loss.tc import simplex_etf
from ncal_core.model.classifier import (
    ClassifierHead,
    attach_head,
    load_classifier,
    save_classifier,
)
from ncal_core.model.lora import adapter_head, inject_lora, read_adapter_config, save_adapter
from ncal_core.model.qwen import load_model

FP32_REL = 1e-5  # max |ours - transformers| / max |transformers| of the class logits, fp32
LABELS = ["a", "b", "c"]
PAD = 0


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [3, 9] right-padded with PAD, attention_mask, seq_lens) of rows of 9, 6 and 3 tokens."""
    generator = torch.Generator().manual_seed(seed)
    lens = torch.tensor([9, 6, 3])
    ids = torch.randint(3, 200, (3, 9), generator=generator)
    mask = (torch.arange(9)[None] < lens[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask, lens


@pytest.fixture(scope="module", params=[("qwen2", False), ("qwen2", True), ("qwen3", False)],
                ids=["qwen2", "qwen2-tied", "qwen3"])
def base(request, tmp_path_factory):
    model_type, tie = request.param
    return make_hf_checkpoint(tmp_path_factory.mktemp(f"{model_type}-{tie}"), model_type=model_type, tie=tie,
                              attention_bias=model_type == "qwen3")


@pytest.mark.parametrize("kind", ["linear", "etf"])
def test_logits_equal_transformers_sequence_classification(base, kind, tmp_path):
    from transformers import AutoModelForSequenceClassification

    frame = simplex_etf(3, 64, seed=1) if kind == "etf" else None
    ours = attach_head(load_model(base), 3, kind, seed=1, frame=frame)
    if kind == "etf":
        with torch.no_grad():
            ours.score.temperature.fill_(3.0)
    save_classifier(ours, tmp_path, LABELS, pad_token_id=PAD)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification")
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    assert (config["num_labels"], config["id2label"], config["label2id"], config["pad_token_id"]) == \
        (3, {"0": "a", "1": "b", "2": "c"}, {"a": 0, "b": 1, "c": 2}, PAD)
    reference = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, mask, lens = padded_batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        got, _ = ours(ids, lens)
        reloaded, _ = load_classifier(tmp_path)(ids, lens)
    assert rel_err(got, expected) <= FP32_REL
    assert rel_err(reloaded, expected) <= FP32_REL


def test_classify_runs_one_forward_per_batch_in_the_prompts_order(base):
    classifier = attach_head(load_model(base), 3, "linear", seed=0)
    ids, _, lens = padded_batch(seed=3)
    prompts = [ids[i, :n].tolist() for i, n in enumerate(lens.tolist())][::-1]  # shortest first: reordered inside
    calls = []
    classifier.model.register_forward_hook(lambda *_: calls.append(1))
    logits, features = classify(classifier, prompts, PAD, batch_size=8, e_w=1.0)
    with torch.no_grad():
        one_by_one = torch.cat([classifier(torch.tensor([p]), torch.tensor([len(p)]))[0] for p in prompts])
    assert len(calls) == 1 + len(prompts)
    assert rel_err(logits, one_by_one) <= FP32_REL
    assert torch.all(features.norm(dim=1) <= 1.0 + 1e-6)


def test_the_etf_head_is_a_fixed_frame_times_a_learned_temperature():
    frame = simplex_etf(4, 16, seed=0)
    head = ClassifierHead(16, 4, "etf", frame=frame)
    assert [name for name, p in head.named_parameters()] == ["temperature"]  # the frame never trains
    gram = head.weight @ head.weight.T
    assert torch.allclose(gram, torch.full((4, 4), -1 / 3) + torch.eye(4) * (4 / 3), atol=1e-6)
    head.temperature.data.fill_(2.5)
    loaded = ClassifierHead(16, 4, "etf")
    loaded.load_weight(head.weight.detach(), "test")
    assert loaded.temperature.item() == pytest.approx(2.5, rel=1e-6)
    assert torch.allclose(loaded.etf, frame, atol=1e-6)


def test_a_score_weight_of_another_shape_is_refused_naming_it():
    with pytest.raises(NCALError, match=r"^ckpt: score.weight: shape \(2, 16\), the head needs \(4, 16\)$"):
        ClassifierHead(16, 4, "linear").load_weight(torch.zeros(2, 16), "ckpt")


def test_a_seq_cls_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = make_hf_checkpoint(tmp_path / "base", model_type="qwen3")
    model = load_model(base)
    inject_lora(model, 4, 8.0, 0.0, ["q_proj", "v_proj"])
    randomise_lora_b(model, std=0.1)
    classifier = attach_head(model, 3, "linear", seed=2)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base), r=4, alpha=8.0, dropout=0.0,
                 target_modules=["q_proj", "v_proj"], head=classifier.score.weight)
    config = read_adapter_config(tmp_path / "adapter" / "adapter_config.json")
    assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["score"])
    assert torch.equal(adapter_head(tmp_path / "adapter"), classifier.score.weight.detach())
    hf = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3, pad_token_id=PAD)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids, mask, lens = padded_batch(seed=1)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        got, _ = classifier.eval()(ids, lens)
    assert rel_err(got, expected) <= FP32_REL


def test_modules_to_save_is_read_only_for_a_seq_cls_head(tmp_path):
    path = tmp_path / "adapter_config.json"
    common = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    path.write_text(json.dumps({**common, "task_type": "SEQ_CLS", "modules_to_save": ["classifier", "score"]}))
    assert read_adapter_config(path)["modules_to_save"] == ["classifier", "score"]
    path.write_text(json.dumps({**common, "task_type": "CAUSAL_LM", "modules_to_save": ["score"]}))
    with pytest.raises(NCALError, match=r"modules_to_save: \['score'\] is not supported \(only a SEQ_CLS adapter's "
                                        r"classification head\)$"):
        read_adapter_config(path)


def test_the_objective_is_logit_adjusted_cross_entropy_over_the_classes_and_tc_reads_the_heads_input(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from ncal_core.data.batching import ATTENTION_BLOCKS, collate
    from ncal_core.data.prompts import EncodedRow
    from ncal_core.loss.classifier_objective import ClassifierObjective
    from ncal_core.loss.logit_adjustment import log_prior
    from ncal_core.loss.tc import TCConfig

    base = make_hf_checkpoint(tmp_path / "base")
    classifier = attach_head(load_model(base), 3, "linear", seed=4)
    save_classifier(classifier, tmp_path / "cls", LABELS, pad_token_id=PAD)
    reference = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    ids, mask, lens = padded_batch(seed=2)
    rows = [EncodedRow(ids[i, :n].tolist(), n, i % 3, str(i)) for i, n in enumerate(lens.tolist())]
    prior = log_prior([10, 3, 1])
    objective = ClassifierObjective(classifier, tc=TCConfig(e_w=0.5, backend="torch"), prior_log=prior, la_tau=1.5)
    with torch.no_grad():
        out = objective(collate(rows, PAD, ATTENTION_BLOCKS))
        logits = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    gold = torch.tensor([r.label_index for r in rows])
    expected = torch.nn.functional.cross_entropy(logits.logits + 1.5 * prior, gold, reduction="sum")
    assert out.lm_sum.item() == pytest.approx(expected.item(), rel=FP32_REL)
    last = logits.hidden_states[-1][torch.arange(3), lens - 1]  # the head's input, as transformers pools it
    clamped = last * (0.5 / last.norm(dim=1, keepdim=True).clamp_min(0.5))
    assert rel_err(out.z, clamped) <= FP32_REL and out.decision_scores is None


def test_a_qwen3_head_adapter_exports_to_what_the_text_classification_pipeline_runs(qwen3_tokenizer_dir, tmp_path):
    """Qwen's real tokenizer and chat template over a random Qwen3: export merges the adapter and the head, and
    transformers' pipeline on the chat prompt gives the probabilities our predictor gives the run's folder."""
    from transformers import AutoTokenizer, pipeline

    from ncal_core.data.rows import Example
    from ncal_core.evaluation.predictor import label_scorer, load_predictor
    from ncal_core.export import ExportConfig, export
    from ncal_core.run_record import RunRecord

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    base = make_hf_checkpoint(tmp_path / "base", model_type="qwen3", vocab_size=len(tokenizer), hidden_size=32,
                              intermediate_size=64, layers=1)
    tokenizer.save_pretrained(base)
    model = load_model(base)
    inject_lora(model, 2, 4.0, 0.0, ["q_proj", "o_proj"])
    randomise_lora_b(model, std=0.2)
    classifier = attach_head(model, 3, "linear", seed=5)
    run = tmp_path / "run"
    save_adapter(model, run, base_model_name_or_path=str(base), r=2, alpha=4.0, dropout=0.0,
                 target_modules=["q_proj", "o_proj"], head=classifier.score.weight)
    tokenizer.save_pretrained(run)
    RunRecord(config={}, labels=LABELS, label_counts=[5, 3, 1], base_model=str(base), use_lora=True,
              logit_adjust_tau=0.0).write(run)
    exported = export(ExportConfig(model_path=str(run), output_dir=str(tmp_path / "export"), dtype="float32"))
    texts = ["三角形的内角和是多少度？", "读作：三千八百四十八", "比较大小：0.5和二分之一"]
    classify = pipeline("text-classification", model=str(exported), top_k=None)
    prompts = [classify.tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                      enable_thinking=False, tokenize=False) for t in texts]
    theirs = [{a["label"]: a["score"] for a in answer} for answer in classify(prompts)]
    predictor = load_predictor(run)
    rows = [Example(id=str(i), messages=[{"role": "user", "content": t}], label=None, where=str(i))
            for i, t in enumerate(texts)]
    ours = label_scorer(predictor, LABELS, torch.zeros(3))(rows).exp()
    for mine, answer in zip(ours, theirs, strict=True):
        assert dict(zip(LABELS, mine.tolist())) == pytest.approx(answer, abs=1e-5)


def test_an_adapter_peft_saved_over_a_sequence_classifier_predicts_with_peft_logits(tmp_path):
    from checkpoint_with_tokenizer import make_checkpoint_with_tokenizer
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from ncal_core.evaluation.predictor import load_predictor

    base = make_checkpoint_with_tokenizer(tmp_path / "base", hidden_size=32, intermediate_size=64, layers=1, heads=2,
                                          kv_heads=1)
    torch.manual_seed(0)
    hf = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3, pad_token_id=PAD)
    peft_model = get_peft_model(hf, LoraConfig(task_type=TaskType.SEQ_CLS, r=2, lora_alpha=4,
                                               target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    predictor = load_predictor(tmp_path / "adapter")
    assert predictor.classifier is not None and predictor.labels is None  # no run record: --labels names them
    ids, mask, lens = padded_batch(seed=4)
    ids = ids % 250 + 3  # inside the small tokenizer's vocabulary, clear of the pad id
    ids = ids.masked_fill(mask == 0, PAD)
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids, attention_mask=mask).logits
        got, _ = predictor.classifier(ids, lens)
    assert rel_err(got, expected) <= FP32_REL


def test_a_seq_cls_adapter_without_a_score_head_is_refused_in_one_line(tmp_path):
    """PEFT's SEQ_CLS modules_to_save may name `classifier`, which Qwen lacks: such an adapter holds no head and is
    not a causal-LM adapter either."""
    from ncal_core.evaluation.predictor import load_predictor

    base = make_hf_checkpoint(tmp_path / "base")
    model = load_model(base)
    inject_lora(model, 2, 4.0, 0.0, ["q_proj"])
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base), r=2, alpha=4.0, dropout=0.0,
                 target_modules=["q_proj"])
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "task_type": "SEQ_CLS", "modules_to_save": ["classifier"]}))
    with pytest.raises(NCALError, match=r"adapter_model.safetensors: base_model.model.score.weight: missing; a SEQ_CLS "
                                        r"adapter of a Qwen model saves its classification head `score`$"):
        load_predictor(tmp_path / "adapter")


def shuffled_head(path, seed: int = 0, order: tuple[int, ...] = (2, 0, 1)):
    """A classification checkpoint over the training rows' classes whose id2label is in `order` (by default not
    sorted), with a tokenizer and no run record; (its folder, its labels in output order)."""
    from checkpoint_with_tokenizer import make_checkpoint_with_tokenizer
    from training_runs import LABELS as ROW_LABELS

    from ncal_core.model.tokenizer import load_tokenizer

    base = make_checkpoint_with_tokenizer(path.parent / f"{path.name}-base", seed=seed, hidden_size=32,
                                          intermediate_size=64, layers=1, heads=2, kv_heads=1)
    classifier = attach_head(load_model(base), 3, "linear", seed=seed)
    with torch.no_grad():
        classifier.score.linear_weight.mul_(100.0)  # clear margins between the classes
    labels = [ROW_LABELS[i] for i in order]
    tokenizer = load_tokenizer(base)
    save_classifier(classifier, path, labels, pad_token_id=tokenizer.pad_token_id)
    tokenizer.save_pretrained(path)
    return path, labels


def head_predictions(folder, rows: list[dict], labels: list[str]) -> list[str]:
    """The classes a head model's outputs name for the rows: output i is labels[i]."""
    from ncal_core.data.rows import Example
    from ncal_core.evaluation.predictor import label_scorer, load_predictor

    examples = [Example(id=r["id"], messages=[{"role": "user", "content": r["question"]}], label=None, where=r["id"])
                for r in rows]
    scores = label_scorer(load_predictor(folder), labels, torch.zeros(len(labels)))(examples)
    return [labels[i] for i in scores.argmax(dim=1).tolist()]


def test_infer_and_analyze_name_a_heads_outputs_by_its_id2label_not_the_sorted_gold_labels(tmp_path):
    from training_runs import tmwpl_rows, write_jsonl

    from ncal_core.analyze import main as analyze
    from ncal_core.evaluation.metrics import classification_report
    from ncal_core.infer import main as infer

    head, labels = shuffled_head(tmp_path / "head")
    rows = tmwpl_rows(9, seed=3)
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    expected = head_predictions(head, rows, labels)
    assert infer(["--model_path", str(head), "--prompts_file", str(data), "--output_file",
                  str(tmp_path / "preds.jsonl")]) == 0
    written = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [p["prediction"] for p in written] == expected
    # an ensemble of the model with itself predicts as the model does
    assert infer(["--model_path", f"{head},{head}", "--prompts_file", str(data), "--output_file",
                  str(tmp_path / "ensemble.jsonl")]) == 0
    written = [json.loads(line) for line in (tmp_path / "ensemble.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [p["prediction"] for p in written] == expected
    assert analyze(["--model_path", str(head), "--prompts_file", str(data), "--output_dir",
                    str(tmp_path / "analysis")]) == 0
    report = json.loads((tmp_path / "analysis" / "eval.json").read_text(encoding="utf-8"))
    gold = [r["class"] for r in rows]
    reference = classification_report([report["labels"].index(g) for g in gold],
                                      [report["labels"].index(p) for p in expected], report["labels"])
    assert report["per_class"] == reference["per_class"]


def test_labels_that_do_not_number_a_heads_outputs_are_refused_in_one_line(tmp_path):
    from training_runs import tmwpl_rows, write_jsonl

    from ncal_core.analyze import main as analyze
    from ncal_core.infer import main as infer

    head, labels = shuffled_head(tmp_path / "head")
    data = write_jsonl(tmp_path / "rows.jsonl", [r for r in tmwpl_rows(6) if r["class"] in labels[:2]])
    message = rf"^--labels: 2 class names, but the classification head of {head} has 3 outputs$"
    with pytest.raises(NCALError, match=message):
        infer(["--model_path", str(head), "--prompt", "x", "--labels", ",".join(labels[:2])])
    with pytest.raises(NCALError, match=message):
        analyze(["--model_path", str(head), "--prompts_file", str(data), "--labels", ",".join(labels[:2]),
                 "--output_dir", str(tmp_path / "analysis")])


def test_an_ensemble_of_heads_whose_outputs_name_the_classes_in_other_orders_is_refused(tmp_path):
    from training_runs import tmwpl_rows, write_jsonl

    from ncal_core.infer import main as infer

    first, labels = shuffled_head(tmp_path / "first")
    second, other = shuffled_head(tmp_path / "second", seed=1, order=(0, 1, 2))
    data = write_jsonl(tmp_path / "rows.jsonl", tmwpl_rows(3))
    with pytest.raises(NCALError, match=rf"^--model_path {second}: its classification head's outputs are the classes "
                                        rf"{','.join(other)} in that order, not {','.join(labels)}; the models of an "
                                        "ensemble score one label set$"):
        infer(["--model_path", f"{first},{second}", "--prompts_file", str(data)])


def test_serve_names_a_heads_outputs_by_its_id2label(tmp_path):
    pytest.importorskip("fastapi")
    from training_runs import tmwpl_rows

    from ncal_core.serve import Classifier, ServeConfig

    head, labels = shuffled_head(tmp_path / "head")
    rows = tmwpl_rows(6, seed=4)
    served = Classifier(ServeConfig(model_path=str(head)))([r["question"] for r in rows])
    assert [answer["label"] for answer in served] == head_predictions(head, rows, labels)
    assert list(served[0]["scores"]) == labels
    with pytest.raises(NCALError, match=rf"^--labels: 2 class names, but the classification head of {head} has 3 "
                                        "outputs$"):
        Classifier(ServeConfig(model_path=str(head), labels=labels[:2]))


def test_analyze_refuses_a_pooling_a_head_model_does_not_use(tmp_path):
    from training_runs import tmwpl_rows, write_jsonl

    from ncal_core.analyze import main as analyze

    head, _ = shuffled_head(tmp_path / "head")
    data = write_jsonl(tmp_path / "rows.jsonl", tmwpl_rows(6))
    with pytest.raises(NCALError, match=rf"^--pooling mean: {head} is a classification head model, whose features are "
                                        r"its head's input, the last token's hidden state; drop --pooling$"):
        analyze(["--model_path", str(head), "--prompts_file", str(data), "--pooling", "mean", "--output_dir",
                 str(tmp_path / "analysis")])
    assert analyze(["--model_path", str(head), "--prompts_file", str(data), "--pooling", "last", "--output_dir",
                    str(tmp_path / "analysis")]) == 0


def test_labels_that_do_not_number_a_seq_cls_adapters_head_are_refused_in_one_line(tmp_path):
    from checkpoint_with_tokenizer import make_checkpoint_with_tokenizer

    from ncal_core.infer import main as infer

    base = make_checkpoint_with_tokenizer(tmp_path / "base", hidden_size=32, intermediate_size=64, layers=1, heads=2,
                                          kv_heads=1)
    model = load_model(base)
    inject_lora(model, 2, 4.0, 0.0, ["q_proj"])
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base), r=2, alpha=4.0, dropout=0.0,
                 target_modules=["q_proj"], head=attach_head(model, 3, "linear", seed=0).score.weight)
    with pytest.raises(NCALError, match=rf"^--labels: 2 class names, but the classification head of "
                                        rf"{tmp_path / 'adapter'} has 3 outputs$"):
        infer(["--model_path", str(tmp_path / "adapter"), "--prompt", "x", "--labels", "a,b"])
    with pytest.raises(NCALError, match=rf"^--model_path {tmp_path / 'adapter'}: a classification head of 3 classes "
                                        "that records no class names; pass --labels, in the order of the head's "
                                        "outputs$"):
        infer(["--model_path", str(tmp_path / "adapter"), "--prompt", "x"])
