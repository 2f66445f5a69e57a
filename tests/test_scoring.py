"""Constrained label scoring: the packed one-pass scorer against separate passes and against transformers."""

from __future__ import annotations

import pytest
import torch
from checkpoint_with_tokenizer import LABELS, TEXTS, make_checkpoint_with_tokenizer
from reference_scoring import chat_prompt_ids, reference_probabilities, summed_logprobs
from transformers import AutoModelForCausalLM

from ncal_core.data.prompts import PromptBuilder
from ncal_core.data.rows import Example
from ncal_core.evaluation import scoring
from ncal_core.evaluation.scoring import score_labels
from ncal_core.model.qwen import load_model
from ncal_core.model.tokenizer import load_tokenizer

# fp32 tolerance on summed log-probabilities and probabilities: differences are accumulation order only
ATOL_FP32 = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = make_checkpoint_with_tokenizer(tmp_path_factory.mktemp("ckpt"))
    tokenizer = load_tokenizer(path)
    builder = PromptBuilder(tokenizer, LABELS, instruction="分类")
    examples = [Example(id=str(i), messages=[{"role": "user", "content": t}], label=None, where="t")
                for i, t in enumerate(TEXTS[:6])]
    return path, tokenizer, builder, [builder.prompt_ids(e) for e in examples], examples


def test_packed_scorer_equals_one_pass_per_label(setup):
    path, _, builder, prompts, _ = setup
    model = load_model(path).eval()
    packed = score_labels(model, prompts, builder.label_ids, batch_size=4)
    naive = summed_logprobs(lambda ids: model.lm_head(model(ids)), prompts, builder.label_ids)
    assert torch.allclose(packed, naive, atol=ATOL_FP32)


def test_label_probabilities_equal_transformers_with_the_chat_template(setup):
    path, tokenizer, builder, prompts, examples = setup
    messages = [[{"role": "system", "content": "分类"}] + e.messages for e in examples]
    assert [chat_prompt_ids(tokenizer, m) for m in messages] == prompts
    reference = reference_probabilities(AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer, messages,
                                        LABELS)
    ours = torch.softmax(score_labels(load_model(path).eval(), prompts, builder.label_ids), dim=1)
    assert torch.allclose(ours, reference, atol=ATOL_FP32)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_token_log_probs_equal_the_whole_log_softmax(monkeypatch, dtype, atol):
    # bf16 weights: both sides take the same bf16 logits up to fp32; only the log-sum-exp's order differs
    torch.manual_seed(0)
    hidden, weight = torch.randn(9, 16, dtype=dtype), torch.randn(203, 16, dtype=dtype)
    targets = torch.tensor([0, 202, 100, 99, 150, 1, 201, 64, 63])  # both ends, and either side of a chunk edge
    expected = torch.log_softmax((hidden @ weight.T).float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    monkeypatch.setattr(scoring, "HEAD_CHUNK_BYTES", 4 * 9 * 64)  # chunks of 64 vocabulary rows, the last of 11
    assert torch.allclose(scoring.token_log_probs(hidden, weight, targets), expected, atol=atol, rtol=0)


def test_scoring_never_holds_a_batch_of_full_vocabulary_logits(setup, monkeypatch):
    path, _, builder, prompts, _ = setup
    model = load_model(path).eval()
    expected = score_labels(model, prompts, builder.label_ids, batch_size=4)
    chunks, linear = [], scoring.F.linear
    head = model.lm_head.weight.untyped_storage().data_ptr()

    def spy(x, weight, bias=None):  # torch.nn.functional.linear itself: every layer's call passes here too
        out = linear(x, weight, bias)
        if weight.untyped_storage().data_ptr() == head:
            chunks.append(out.shape)
        return out

    budget = 4 * 64 * 10  # bytes of fp32 logits per chunk
    monkeypatch.setattr(scoring, "HEAD_CHUNK_BYTES", budget)
    monkeypatch.setattr(scoring.F, "linear", spy)
    assert torch.allclose(score_labels(model, prompts, builder.label_ids, batch_size=4), expected, atol=ATOL_FP32)
    assert chunks and all(4 * rows * cols <= budget < 4 * rows * model.config.vocab_size for rows, cols in chunks)


def test_scoring_forwards_hold_at_most_eval_tokens_padded_tokens(setup, monkeypatch):
    path, _, builder, prompts, _ = setup
    model = load_model(path).eval()
    expected = score_labels(model, prompts, builder.label_ids, batch_size=4)
    widths, forward = [], model.forward

    def spy(input_ids, **kwargs):
        widths.append(input_ids.shape)
        return forward(input_ids, **kwargs)

    budget = 2 * max(len(p) for p in prompts) + 2 * sum(len(label) for label in builder.label_ids)
    monkeypatch.setattr(scoring, "EVAL_TOKENS", budget)  # two of the longest packed rows a forward
    monkeypatch.setattr(model, "forward", spy)
    assert torch.allclose(score_labels(model, prompts, builder.label_ids, batch_size=4), expected, atol=ATOL_FP32)
    assert len(widths) > 2 and all(rows * width <= budget for rows, width in widths)
    assert max(rows for rows, _ in widths) == 2
