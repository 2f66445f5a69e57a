"""Prompt ids against transformers' apply_chat_template, target ids, truncation, with Qwen3's and the tiny tokenizer."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ncal_core.data.prompts import PromptBuilder
from ncal_core.data.rows import Example, label_set, load_examples
from ncal_core.errors import NCALError
from ncal_core.model.tiny_tokenizer import train_tokenizer
from ncal_core.model.tokenizer import load_tokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "examples"
LABELS = ["回忆", "识别", "表征建模", "选取策略", "R-FR"]
INSTRUCTION = "判断题目考查的认知层次。"
GENERATION_PROMPT = {"qwen3": "<|im_start|>assistant\n<think>\n\n</think>\n\n", "tiny": "<|im_start|>assistant\n"}


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny tokenizer trained on the project's example rows."""
    texts = [e.messages[-1]["content"] for name in sorted(EXAMPLES.iterdir()) for e in load_examples(name)]
    out = tmp_path_factory.mktemp("tiny")
    train_tokenizer(texts * 4 + LABELS, out, vocab_size=600)
    return out


@pytest.fixture(scope="module")
def qwen3(qwen3_tokenizer_dir):
    """Qwen3's real tokenizer, loaded once for the module."""
    return load_tokenizer(qwen3_tokenizer_dir)


@pytest.fixture(scope="module", params=["qwen3", "tiny"])
def named_tokenizer(request, tiny_tokenizer_dir):
    """(name, tokenizer) for Qwen3's real tokenizer and the tiny one."""
    if request.param == "qwen3":
        return "qwen3", request.getfixturevalue("qwen3")
    return "tiny", load_tokenizer(tiny_tokenizer_dir)


def template_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The reference: transformers' own tokenised chat template (a list or a dict, depending on the version)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def user(text: str, label: str | None = "回忆", *, system: str | None = None, example_id: str = "x") -> Example:
    """An example with one user turn (and an optional system turn of its own)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return Example(id=example_id, messages=messages, label=label, where="test.jsonl:1")


def shipped_examples() -> list[Example]:
    """The example rows of every format, with labels they carry."""
    return [e for name in sorted(EXAMPLES.iterdir()) for e in load_examples(name)]


@pytest.mark.parametrize("instruction", [None, INSTRUCTION])
def test_prompt_ids_equal_transformers_chat_template(named_tokenizer, instruction):
    _, tokenizer = named_tokenizer
    examples = [*shipped_examples(), user("A  spaced\n\ntext, 123 and 漢字"), user("t", system="row's own system turn")]
    builder = PromptBuilder(tokenizer, sorted({e.label for e in examples}), instruction=instruction)
    for example in examples:
        messages = example.messages
        if instruction and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": instruction}, *messages]
        assert builder.prompt_ids(example) == template_ids(tokenizer, messages)


def test_prompt_ids_equal_chat_template_on_real_tmwpl_rows(qwen3, tmwpl_dir):
    tokenizer = qwen3
    examples = load_examples(tmwpl_dir / "TMWPL_test.jsonl")
    builder = PromptBuilder(tokenizer, label_set(examples, "test"), instruction=INSTRUCTION)
    prompts = builder.prompt_ids_all(examples)
    for example, prompt in zip(examples, prompts, strict=True):
        reference = [{"role": "system", "content": INSTRUCTION}, *example.messages]
        assert prompt == template_ids(tokenizer, reference)


def test_qwen3_prompt_ends_with_thinking_turned_off(qwen3):
    tokenizer = qwen3
    prompt = PromptBuilder(tokenizer, LABELS).prompt_ids(user("题目"))
    assert tokenizer.decode(prompt) == "<|im_start|>user\n题目<|im_end|>\n" + GENERATION_PROMPT["qwen3"]


def test_eos_is_im_end(named_tokenizer):
    _, tokenizer = named_tokenizer
    builder = PromptBuilder(tokenizer, LABELS)
    assert builder.eos_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_targets_are_exactly_label_ids_then_eos(named_tokenizer):
    _, tokenizer = named_tokenizer
    builder = PromptBuilder(tokenizer, LABELS)
    for label in LABELS:
        row = builder.encode(user("一道题", label))
        expected = tokenizer(label, add_special_tokens=False)["input_ids"] + [builder.eos_id]
        assert row.input_ids[row.prompt_len :] == expected
        assert row.input_ids[: row.prompt_len] == builder.prompt_ids(user("一道题", label))
        assert row.label_index == LABELS.index(label)
        assert builder.label_ids[row.label_index] == expected


def test_label_ids_are_the_same_whatever_the_prompt(named_tokenizer):
    _, tokenizer = named_tokenizer
    builder = PromptBuilder(tokenizer, LABELS, instruction=INSTRUCTION)
    prompts = ["短", "一个很长的题目，" * 20 + "回", "ends with a space ", "表征"]
    for label in LABELS:
        targets = {
            tuple(row.input_ids[row.prompt_len :]) for row in builder.encode_all([user(p, label) for p in prompts])
        }
        assert targets == {tuple(builder.label_ids[LABELS.index(label)])}


def test_encoding_no_examples_gives_no_rows(named_tokenizer):
    assert PromptBuilder(named_tokenizer[1], LABELS).encode_all([]) == []


def test_unlabeled_row_is_the_prompt_alone(named_tokenizer):
    _, tokenizer = named_tokenizer
    builder = PromptBuilder(tokenizer, LABELS)
    row = builder.encode(user("题目", None, example_id="u1"))
    assert (row.input_ids, row.prompt_len, row.label_index, row.example_id) == (
        builder.prompt_ids(user("题目")),
        len(row.input_ids),
        -1,
        "u1",
    )


def test_label_outside_the_builder_labels_is_an_ncal_error(named_tokenizer):
    _, tokenizer = named_tokenizer
    with pytest.raises(NCALError, match=r"test\.jsonl:1: class 'zz' is not one of the labels"):
        PromptBuilder(tokenizer, LABELS).encode(user("题目", "zz"))


@pytest.mark.parametrize("truncation", ["left", "middle"])
def test_truncation_cuts_only_the_user_text(named_tokenizer, truncation):
    name, tokenizer = named_tokenizer
    text = "BEGIN " + "filler words " * 300 + "FINISH"
    cutoff = 80
    builder = PromptBuilder(tokenizer, LABELS, instruction=INSTRUCTION, cutoff_len=cutoff, truncation=truncation)
    longest = max(map(len, builder.label_ids))
    for label in LABELS:
        row = builder.encode(user(text, label))
        assert row.prompt_len == cutoff - longest
        assert row.input_ids[row.prompt_len :] == builder.label_ids[LABELS.index(label)]
        prompt = tokenizer.decode(row.input_ids[: row.prompt_len])
        head = f"<|im_start|>system\n{INSTRUCTION}<|im_end|>\n<|im_start|>user\n"
        tail = "<|im_end|>\n" + GENERATION_PROMPT[name]
        assert prompt.startswith(head) and prompt.endswith(tail)
        kept = prompt[len(head) : -len(tail)]
        assert kept.endswith("FINISH") and len(kept) < len(text)
        assert kept.startswith("BEGIN") == (truncation == "middle")


def test_rows_that_fit_exactly_are_not_cut(named_tokenizer):
    _, tokenizer = named_tokenizer
    example = user("正好放得下的题目")
    full = template_ids(tokenizer, example.messages)
    longest = max(map(len, PromptBuilder(tokenizer, LABELS).label_ids))
    exact_fit = PromptBuilder(tokenizer, LABELS, cutoff_len=len(full) + longest)
    assert exact_fit.prompt_ids(example) == full
    one_short = PromptBuilder(tokenizer, LABELS, cutoff_len=len(full) + longest - 1)
    assert len(one_short.prompt_ids(example)) == len(full) - 1


def test_framing_longer_than_cutoff_is_an_ncal_error(named_tokenizer):
    _, tokenizer = named_tokenizer
    builder = PromptBuilder(tokenizer, LABELS, instruction=INSTRUCTION * 5, cutoff_len=24)
    with pytest.raises(NCALError, match=r"test\.jsonl:1: cutoff_len 24 is too small"):
        builder.encode(user("题目"))


def test_unknown_truncation_is_an_ncal_error(named_tokenizer):
    _, tokenizer = named_tokenizer
    with pytest.raises(NCALError, match="truncation: must be one of"):
        PromptBuilder(tokenizer, LABELS, truncation="right")


def test_encode_all_matches_encode_and_is_fast_on_tmwpl(qwen3, tmwpl_dir):
    tokenizer = qwen3
    examples = load_examples(tmwpl_dir / "TMWPL_train.jsonl")
    builder = PromptBuilder(tokenizer, label_set(examples, "train"), instruction=INSTRUCTION, cutoff_len=128)
    start = time.perf_counter()
    rows = builder.encode_all(examples)
    elapsed = time.perf_counter() - start
    assert elapsed < 8, f"encoding {len(rows)} rows took {elapsed:.1f} s"
    assert rows[:40] == [builder.encode(example) for example in examples[:40]]
    assert max(len(row.input_ids) for row in rows) <= 128
    assert any(row.prompt_len == 128 - max(map(len, builder.label_ids)) for row in rows), (
        "no row was long enough to cut"
    )


def copy_tokenizer(source: Path, dest: Path, **config_changes: object) -> Path:
    """A copy of a tokenizer folder with some tokenizer_config.json keys replaced (None removes a key)."""
    shutil.copytree(source, dest)
    config_path = dest / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key, value in config_changes.items():
        config.pop(key) if value is None else config.__setitem__(key, value)
    config_path.write_text(json.dumps(config), encoding="utf-8")
    return dest


def test_tokenizer_without_chat_template_is_an_ncal_error(tiny_tokenizer_dir, tmp_path):
    folder = copy_tokenizer(tiny_tokenizer_dir, tmp_path / "no_template", chat_template=None)
    assert AutoTokenizer.from_pretrained(folder).chat_template is None
    with pytest.raises(NCALError, match="no chat template"):
        load_tokenizer(folder)


def test_tokenizer_without_eos_is_an_ncal_error(tiny_tokenizer_dir, tmp_path):
    with pytest.raises(NCALError, match="no eos token"):
        load_tokenizer(copy_tokenizer(tiny_tokenizer_dir, tmp_path / "no_eos", eos_token=None))


def test_folder_without_tokenizer_files_is_an_ncal_error(tmp_path):
    with pytest.raises(NCALError, match="no tokenizer here"):
        load_tokenizer(tmp_path)
    with pytest.raises(NCALError, match="no tokenizer here"):
        load_tokenizer(tmp_path / "missing")
