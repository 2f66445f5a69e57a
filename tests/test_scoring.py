"""Constrained label scoring: the packed one-pass scorer against separate passes and against transformers."""

from __future__ import annotations

import pytest
import torch
from checkpoint_with_tokenizer import LABELS, TEXTS, make_checkpoint_with_tokenizer
from transformers import AutoModelForCausalLM

from ncal_core.data import Example
from ncal_core.model import load_model
from ncal_core.prompts import PromptBuilder, load_tokenizer
from ncal_core.scoring import score_labels

# fp32 tolerance on summed log-probabilities (a few tokens each): differences are accumulation order only
ATOL_FP32 = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = make_checkpoint_with_tokenizer(tmp_path_factory.mktemp("ckpt"))
    tokenizer = load_tokenizer(path)
    builder = PromptBuilder(tokenizer, LABELS, instruction="分类")
    examples = [Example(id=str(i), messages=[{"role": "user", "content": t}], label=None, where="t")
                for i, t in enumerate(TEXTS[:6])]
    return path, tokenizer, builder, [builder.prompt_ids(e) for e in examples], examples


def _naive_scores(logits_of, prompts, label_ids):
    """One full forward per (prompt, label): the definition of METHOD.md §1 written out."""
    out = torch.zeros(len(prompts), len(label_ids))
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            for c, label in enumerate(label_ids):
                logp = torch.log_softmax(logits_of(torch.tensor([prompt + label]))[0].float(), -1)
                out[i, c] = sum(logp[len(prompt) - 1 + j, tok] for j, tok in enumerate(label))
    return out


def test_packed_scorer_equals_one_pass_per_label(setup):
    path, _, builder, prompts, _ = setup
    model = load_model(path).eval()
    packed = score_labels(model, prompts, builder.label_ids, batch_size=4)
    naive = _naive_scores(lambda ids: model.lm_head(model(ids)), prompts, builder.label_ids)
    assert torch.allclose(packed, naive, atol=ATOL_FP32)


def test_label_probabilities_equal_transformers_with_the_chat_template(setup):
    path, tokenizer, builder, prompts, examples = setup
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref_prompts = []
    for example in examples:
        ids = tokenizer.apply_chat_template([{"role": "system", "content": "分类"}] + example.messages,
                                            add_generation_prompt=True, tokenize=True)
        ref_prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    assert ref_prompts == prompts
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ref_labels = [tokenizer(label, add_special_tokens=False)["input_ids"] + [eos] for label in LABELS]
    reference = torch.softmax(_naive_scores(lambda ids: ref_model(ids).logits, ref_prompts, ref_labels), dim=1)
    ours = torch.softmax(score_labels(load_model(path).eval(), prompts, builder.label_ids), dim=1)
    assert torch.allclose(ours, reference, atol=ATOL_FP32)


def test_features_are_the_last_prompt_token_hidden_state(setup):
    path, _, builder, prompts, _ = setup
    model = load_model(path).eval()
    _, features = score_labels(model, prompts, builder.label_ids, return_features=True)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            assert torch.allclose(features[i], model(torch.tensor([prompt]))[0, -1], atol=1e-5)
