"""The tiny tokenizer: loads with AutoTokenizer, ChatML turns, few tokens on Chinese text, byte-identical retraining,
and the same ids through every loader of the full tiny checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from ncal_core.model.tiny import build_tiny_checkpoint
from ncal_core.model.tiny_tokenizer import train_tokenizer
from ncal_core.model.tokenizer import load_tokenizer


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


@pytest.fixture(scope="module")
def checkpoint(questions, tmp_path_factory) -> Path:
    """The full tiny checkpoint folder (config.json says qwen2) with a 4k tokenizer trained on the TMWPL questions."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), questions, seed=0, vocab_size=4096, hidden_size=64,
                                 num_layers=1)


@pytest.fixture(scope="module")
def labels(tmwpl_dir) -> list[str]:
    """The TMWPL class names."""
    with open(tmwpl_dir / "TMWPL_train.jsonl", encoding="utf-8") as f:
        return sorted({json.loads(line)["class"] for line in f})


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
    # Qwen3's 151k vocabulary needs 38 tokens per question on average; a 4k vocabulary fit to TMWPL under Qwen's
    # pre-split (one token per digit) needs 31.
    assert mean < 33, mean
    assert all(tokenizer.decode(i) == q for i, q in zip(ids[:500], questions[:500], strict=True))


def test_retraining_gives_byte_identical_files(trained, questions, tmp_path):
    train_tokenizer(questions, tmp_path, vocab_size=4096)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (trained[0] / name).read_bytes(), name


@pytest.mark.parametrize("loader", [AutoTokenizer.from_pretrained, load_tokenizer])
def test_every_loader_of_the_full_checkpoint_gives_the_ids_training_meant(checkpoint, questions, loader):
    # config.json says qwen2, so transformers loads the folder as Qwen2Tokenizer, which sets its own normalizer and
    # pre-tokenizer: they must be the ones the BPE was trained under
    tokenizer = loader(checkpoint)
    trained = json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    loaded = json.loads(tokenizer.backend_tokenizer.to_str())
    for part in ("normalizer", "pre_tokenizer", "decoder"):
        assert loaded[part] == trained[part], part
    raw = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    ids = tokenizer(questions, add_special_tokens=False)["input_ids"]
    assert ids == [e.ids for e in raw.encode_batch(questions, add_special_tokens=False)]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": questions[0]}], add_generation_prompt=True,
                                           tokenize=False)
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == raw.encode(prompt, add_special_tokens=False).ids


def test_the_full_checkpoint_takes_few_tokens_per_question_and_uses_its_vocabulary(checkpoint, questions):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer(questions, add_special_tokens=False)["input_ids"]
    mean = sum(map(len, ids)) / len(ids)
    assert mean < 33, mean  # 31.0; a pre-split other than the one trained under gave 35
    used = len({i for row in ids for i in row}) / len(tokenizer)
    assert used > 0.9, used  # 3858 of 4096; a pre-split other than the one trained under reached 2760


def test_labels_left_out_of_the_corpus_are_ordinary_text_with_distinct_first_tokens(trained, labels):
    tokenizer = AutoTokenizer.from_pretrained(trained[0])
    ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
    assert all(len(i) > 1 for i in ids), dict(zip(labels, ids))
    assert len({i[0] for i in ids}) == len(labels)  # TMWPL's labels part at their first token
