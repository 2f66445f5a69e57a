"""The real pretrained Qwen2.5-Coder-0.5B-Instruct (24 layers, vocabulary 151,936, untied head) against transformers
and peft: logits, label scores, one LoRA step, an exported run, greedy generation.

The folder is built by ../shared/models/build_qwen_coder.py (docs/real_model.md); without it every test here skips
saying why. Prompts are a few short rows, so the whole file stays within minutes on two cores.
Tolerances (max |ours - ref| / max |ref| unless said otherwise), with what was measured on this checkpoint:
  fp32 logits 1e-4 (measured 7e-7); fp32 summed label log-probabilities (-20 to -50 nats here) 1e-5 relative
  (measured 3e-6: the label-only head sums the vocabulary's logsumexp in chunks).
  bf16 weights on both sides (transformers' SDPA attention): logits 2e-2, about two bf16 ulps (measured 0).
  bf16 autocast of our fp32 model against its own fp32 label probabilities: 4e-2 absolute (measured 1.7e-2).
  One LoRA step (fp32): loss 1e-5 relative (measured 8e-8); each adapter factor's gradient 1e-3 (measured 2.5e-5
  with one thread, 1.1e-4 with two: the backward's sums over 24 layers change order with the thread count).
  The export, reloaded by transformers, against our unmerged run: label probabilities 1e-4 absolute (measured
  7e-6: the merged matmul sums in another order than the unmerged one).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from random_checkpoints import our_logits, randomise_lora_b, rel_err
from reference_scoring import chat_prompt_ids, reference_probabilities, summed_logprobs
from training_runs import run, trained_lora_run, write_jsonl
from transformers import AutoModelForCausalLM

from ncal_core.data.batching import ATTENTION_BLOCKS, collate
from ncal_core.data.prompts import PromptBuilder
from ncal_core.data.rows import Example
from ncal_core.evaluation.predictor import load_predictor
from ncal_core.evaluation.scoring import score_labels
from ncal_core.infer import main as infer_main
from ncal_core.loss.objective import TrainingObjective
from ncal_core.model.lora import inject_lora, peft_key, save_adapter
from ncal_core.model.qwen import load_model
from ncal_core.model.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

FP32_TOL = 1e-4
SCORE_RTOL = 1e-5
BF16_TOL = 2e-2
AUTOCAST_PROB_ATOL = 4e-2
LOSS_RTOL = 1e-5
GRAD_TOL = 1e-3
EXPORT_PROB_ATOL = 1e-4

LABELS = ["分析", "回忆", "推断", "表征建模", "识别", "过程实施", "选取策略"]  # TMWPL's seven classes, sorted
QUESTIONS = ["三角形的内角和是多少度？", "小明有5个苹果，吃了2个，还剩几个？", "比较大小：0.5和二分之一"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def examples(n: int = len(QUESTIONS)) -> list[Example]:
    """The first n QUESTIONS as labelled rows (classes in turn)."""
    return [Example(id=f"q{i}", messages=[{"role": "user", "content": q}], label=LABELS[i % len(LABELS)],
                    where=f"QUESTIONS[{i}]") for i, q in enumerate(QUESTIONS[:n])]


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    return load_tokenizer(real_model_dir)


@pytest.fixture(scope="module")
def builder(tokenizer) -> PromptBuilder:
    return PromptBuilder(tokenizer, LABELS)


@pytest.fixture(scope="module")
def ours(real_model_dir):
    return load_model(real_model_dir)


@pytest.fixture(scope="module")
def hf(real_model_dir):
    return AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def prompts(tokenizer, builder) -> list[list[int]]:
    """transformers' own rendering of the rows' chat prompts, which must be ours too."""
    rendered = [chat_prompt_ids(tokenizer, e.messages) for e in examples()]
    assert builder.prompt_ids_all(examples()) == rendered
    return rendered


def test_fp32_logits_equal_transformers(ours, hf, prompts) -> None:
    width = min(map(len, prompts))
    ids = torch.tensor([p[:width] for p in prompts])
    with torch.no_grad():
        reference = hf(input_ids=ids).logits
    assert rel_err(our_logits(ours, ids), reference) < FP32_TOL


def test_fp32_label_scores_equal_transformers(ours, hf, prompts, builder) -> None:
    reference = summed_logprobs(lambda ids: hf(input_ids=ids).logits, prompts[:2], builder.label_ids)
    scores = score_labels(ours, prompts[:2], builder.label_ids)
    assert torch.allclose(scores, reference, rtol=SCORE_RTOL, atol=0)


def test_bf16_logits_match_transformers_bf16(real_model_dir, prompts) -> None:
    ids = torch.tensor([prompts[0]])
    reference = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    ours = our_logits(load_model(real_model_dir, dtype=torch.bfloat16), ids)
    assert ours.dtype == torch.bfloat16
    assert rel_err(ours, expected) < BF16_TOL


def test_bf16_autocast_label_probabilities_stay_near_fp32(ours, prompts, builder) -> None:
    fp32 = score_labels(ours, prompts, builder.label_ids).softmax(1)  # transformers' (the fp32 tests above)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = score_labels(ours, prompts, builder.label_ids).softmax(1)
    assert torch.allclose(probs, fp32, rtol=0, atol=AUTOCAST_PROB_ATOL)


def test_one_lora_step_gives_peft_loss_and_adapter_gradients(real_model_dir, builder, tmp_path) -> None:
    from peft import PeftModel

    rows = builder.encode_all(examples())
    model = load_model(real_model_dir)
    inject_lora(model, r=8, alpha=32, dropout=0.0, target_modules=TARGETS)
    randomise_lora_b(model, std=0.01)  # with B = 0 the A factors get no gradient
    save_adapter(model, tmp_path, base_model_name_or_path=str(real_model_dir), r=8, alpha=32, dropout=0.0,
                 target_modules=TARGETS)
    model.train()
    targets = sum(len(r.input_ids) - r.prompt_len for r in rows)
    loss = TrainingObjective(model)(collate(rows, 0, ATTENTION_BLOCKS)).lm_sum / targets  # the training loop's LM loss
    loss.backward()
    grads = {peft_key(name): p.grad for name, p in model.named_parameters() if p.requires_grad}
    del model

    base = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32, attn_implementation="eager")
    reference = PeftModel.from_pretrained(base, tmp_path, is_trainable=True).train()
    expected = 0.0
    for row in rows:  # one row at a time: no padding, transformers' plain causal LM loss on the label tokens
        logits = reference(input_ids=torch.tensor([row.input_ids])).logits[0]
        labels = torch.tensor(row.input_ids[row.prompt_len:])
        expected = expected + F.cross_entropy(logits[row.prompt_len - 1:-1], labels, reduction="sum")
    expected = expected / targets
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=LOSS_RTOL)
    theirs = {name.replace(".default.", "."): p.grad for name, p in reference.named_parameters() if p.requires_grad}
    assert sorted(theirs) == sorted(grads) and len(grads) == 24 * len(TARGETS) * 2
    worst = max(grads, key=lambda k: rel_err(grads[k], theirs[k]))
    assert rel_err(grads[worst], theirs[worst]) < GRAD_TOL, worst


def test_exported_lora_run_loads_in_transformers_and_predicts_what_the_run_predicts(real_model_dir, ours, tmp_path
                                                                                      ) -> None:
    out, env = trained_lora_run(tmp_path, base=real_model_dir, rows=8,
                                flags=["--max_steps", "1", "--per_device_train_batch_size", "4", "--val_size", "0"])
    exported = tmp_path / "exported"
    result = run("ncal_core.export", ["--model_path", str(out), "--output_dir", str(exported), "--dtype", "float32"],
                 env)
    assert result.returncode == 0, result.stderr[-3000:]
    predictor = load_predictor(out)
    labels = predictor.labels
    rows = [Example(id=e.id, messages=e.messages, label=None, where=e.where) for e in examples(2)]
    prompts = predictor.prompt_builder(labels).prompt_ids_all(rows)
    label_ids = predictor.prompt_builder(labels).label_ids
    base_probs = score_labels(ours, prompts, label_ids).softmax(1)
    run_probs = score_labels(predictor.model, prompts, label_ids).softmax(1)
    assert (run_probs - base_probs).abs().max() > 10 * EXPORT_PROB_ATOL  # the step changed what the model says
    merged = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager").eval()
    reference = reference_probabilities(merged, load_tokenizer(exported), [r.messages for r in rows], labels)
    assert torch.allclose(run_probs, reference, rtol=0, atol=EXPORT_PROB_ATOL)
    assert run_probs.argmax(1).tolist() == reference.argmax(1).tolist()


def test_infer_generate_gives_transformers_greedy_tokens(hf, tokenizer, real_model_dir, tmp_path) -> None:
    rows = [{"id": e.id, "question": e.messages[0]["content"], "class": e.label} for e in examples(2)]
    out = tmp_path / "generated.jsonl"
    assert infer_main(["--model_path", str(real_model_dir), "--prompts_file", str(write_jsonl(tmp_path / "rows.jsonl",
                       rows)), "--output_file", str(out), "--generate", "true", "--max_new_tokens", "6"]) == 0
    generated = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    for row, line in zip(rows, generated, strict=True):
        prompt = torch.tensor([chat_prompt_ids(tokenizer, [{"role": "user", "content": row["question"]}])])
        # transformers' greedy decoding, stopping where its generation_config says
        ids = hf.generate(prompt, max_new_tokens=6, do_sample=False)[0, prompt.shape[1]:].tolist()
        assert line["prediction"] == tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert all(line["prediction"] for line in generated)  # the model said something: the comparison is not vacuous
