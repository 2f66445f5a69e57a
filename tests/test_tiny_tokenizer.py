"""The tiny tokenizer: loads with AutoTokenizer, ChatML turns, few tokens on Chinese text, byte-identical retraining."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ncal_core.model.tiny_tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def questions(tmwpl_dir) -> list[str]:
    """Every TMWPL training question."""
    with open(tmwpl_dir / "TMWPL_train.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["question"] for line in f]


@pytest.fixture(scope="module")
def trained(questions, tmp_path_factory) -> tuple[Path, float]:
    """(folder, seconds taken) of a 4k tokenizer trained on the TMWPL questions."""
    out = tmp_path_factory.mktemp("tiny")
    start = time.perf_counter()
    train_tokenizer(questions, out, vocab_size=4096)
    return out, time.perf_counter() - start


def test_training_on_tmwpl_is_fast_and_fills_the_vocabulary(trained):
    folder, seconds = trained
    assert seconds < 10
    assert len(AutoTokenizer.from_pretrained(folder)) == 4096


def test_loads_with_autotokenizer_with_chatml_special_tokens(trained):
    tokenizer = AutoTokenizer.from_pretrained(trained[0])
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    assert (
        tokenizer("题目", add_special_tokens=True)["input_ids"]
        == tokenizer("题目", add_special_tokens=False)["input_ids"]
    )


def test_chat_template_is_chatml_without_a_default_system_turn(trained):
    tokenizer = AutoTokenizer.from_pretrained(trained[0])
    user = [{"role": "user", "content": "一加一等于几？"}]
    assert tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>user\n一加一等于几？<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "分类"}, *user, {"role": "assistant", "content": "回忆"}]
    assert tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\n分类<|im_end|>\n<|im_start|>user\n一加一等于几？<|im_end|>\n<|im_start|>assistant\n回忆<|im_end|>\n"
    )


def test_chinese_questions_take_few_tokens_and_round_trip(trained, questions):
    tokenizer = AutoTokenizer.from_pretrained(trained[0])
    ids = tokenizer(questions, add_special_tokens=False)["input_ids"]
    mean = sum(map(len, ids)) / len(ids)
    # Qwen3's 151k vocabulary needs 38 tokens per question on average; a 4k vocabulary fit to TMWPL needs ~25.
    assert mean < 30, mean
    assert all(tokenizer.decode(i) == q for i, q in zip(ids[:500], questions[:500], strict=True))


def test_retraining_gives_byte_identical_files(trained, questions, tmp_path):
    train_tokenizer(questions, tmp_path, vocab_size=4096)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (trained[0] / name).read_bytes(), name
