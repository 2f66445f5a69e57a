"""Loading rows: the three formats, one file:line error per kind of bad input, and never a stray exception."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ncal_core.data.rows import Example, check_labels, label_set, load_examples
from ncal_core.errors import NCALError

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "examples"


def write(path: Path, content: str | bytes) -> Path:
    """Write text (UTF-8) or raw bytes to path and return it."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def rows(*values: object) -> str:
    """JSONL text of the given values, one a line."""
    return "".join(json.dumps(value, ensure_ascii=False) + "\n" for value in values)


def test_tmwpl_rows_become_one_user_turn_with_their_class(tmp_path):
    path = write(
        tmp_path / "t.jsonl",
        rows({"id": "a", "question": "1+1=?", "class": "回忆"}, {"question": "2+2=?", "class": "识别"}),
    )
    assert load_examples(path) == [
        Example(id="a", messages=[{"role": "user", "content": "1+1=?"}], label="回忆", where=f"{path}:1"),
        Example(id="t:2", messages=[{"role": "user", "content": "2+2=?"}], label="识别", where=f"{path}:2"),
    ]


def test_real_tmwpl_train_loads_with_seven_classes(tmwpl_dir):
    examples = load_examples(tmwpl_dir / "TMWPL_train.jsonl")
    assert len(examples) == 8262
    assert label_set(examples, "train") == sorted(["回忆", "选取策略", "识别", "表征建模", "过程实施", "推断", "分析"])
    check_labels(load_examples(tmwpl_dir / "TMWPL_test.jsonl"), label_set(examples, "train"), "train")


def test_pmtd_rows_render_a_transcript_with_the_utterance_marked(tmp_path):
    row = {
        "id": "d",
        "dialog_content": "是六分之五。",
        "class": "R-SR",
        "dialog_history": [{"teacher": "后面三项呢？"}, {"student": "是六分之五。"}, {"teacher": "对吗？"}],
    }
    (example,) = load_examples(write(tmp_path / "p.jsonl", rows(row)))
    assert example.label == "R-SR"
    assert example.messages == [
        {
            "role": "user",
            "content": "Teacher: 后面三项呢？\nStudent (utterance to classify): 是六分之五。\nTeacher: 对吗？",
        }
    ]


def test_pmtd_marks_the_repeated_utterance_nearest_the_centre(tmp_path):
    history = [
        {"student": "对。"},
        {"teacher": "这样可以吗？"},
        {"student": "对。"},
        {"teacher": "好。"},
        {"student": "对。"},
    ]
    path = write(tmp_path / "p.jsonl", rows({"dialog_content": "对。", "class": "U", "dialog_history": history}))
    lines = load_examples(path)[0].messages[0]["content"].split("\n")
    assert [i for i, line in enumerate(lines) if "utterance to classify" in line] == [2]


def test_pmtd_utterance_missing_from_the_window_is_added_last(tmp_path):
    row = {"dialog_content": "八。", "class": "U", "dialog_history": [{"teacher": "第一题填什么？"}]}
    content = load_examples(write(tmp_path / "p.jsonl", rows(row)))[0].messages[0]["content"]
    assert content == "Teacher: 第一题填什么？\n(utterance to classify): 八。"


def test_conversation_rows_keep_system_turn_and_drop_the_answer(tmp_path):
    row = {
        "conversation": [
            {"role": "system", "content": "分类"},
            {"role": "user", "content": "题目"},
            {"role": "assistant", "content": "回忆"},
        ],
        "label": "回忆",
    }
    expected = [{"role": "system", "content": "分类"}, {"role": "user", "content": "题目"}]
    from_jsonl = load_examples(write(tmp_path / "c.jsonl", rows(row)))
    from_array = load_examples(write(tmp_path / "c.json", json.dumps([row], ensure_ascii=False, indent=2)))
    assert from_jsonl[0].messages == expected
    assert from_array[0].messages == expected
    assert from_array[0].where == f"{tmp_path / 'c.json'}:2"


def test_json_array_items_are_named_by_the_line_they_start_on(tmp_path):
    text = '[\n  {"question": "a", "class": "x"},\n\n  {"question": "b",\n   "class": "y"}\n]\n'
    examples = load_examples(write(tmp_path / "a.json", text))
    assert [e.where for e in examples] == [f"{tmp_path / 'a.json'}:2", f"{tmp_path / 'a.json'}:4"]
    assert [e.id for e in examples] == ["a:2", "a:4"]


def test_example_files_shipped_with_the_project_load():
    for name in ("tmwpl_style.jsonl", "pmtd_style.jsonl", "conversation.json"):
        examples = load_examples(EXAMPLES / name)
        assert len(examples) >= 3
        assert all(example.messages[-1]["role"] == "user" for example in examples)


def test_unlabeled_rows_load_when_labels_are_optional(tmp_path):
    path = write(tmp_path / "u.jsonl", rows({"question": "a"}, {"question": "b", "class": None}))
    assert [e.label for e in load_examples(path, require_labels=False)] == [None, None]
    with pytest.raises(NCALError, match=r"u\.jsonl:1: class: missing"):
        load_examples(path)


TMWPL_ROW = {"question": "q", "class": "c"}
PMTD_ROW = {"dialog_content": "u", "class": "c", "dialog_history": [{"student": "u"}]}


def conversation(*turns: tuple[str, str], label: str = "c") -> dict:
    """A conversation-format row from (role, content) pairs."""
    return {"conversation": [{"role": role, "content": content} for role, content in turns], "label": label}


# (case, file content, line named in the message or None for the file only, fragment of the message)
BAD_FILES = [
    ("malformed_json", rows(TMWPL_ROW) + '{"question": \n', 2, "malformed JSON"),
    ("malformed_json_array", '[{"question": "q", "class": "c"},\n {"question": }]', 2, "malformed JSON"),
    ("not_utf8", b'{"question": "q", "class": "c"}\n{"question": "\xff\xfe", "class": "c"}\n', 2, "not UTF-8"),
    ("empty_file", "", None, "the file is empty"),
    ("blank_file", "\n \n\t\n", None, "the file is empty"),
    ("empty_json_array", "[]", None, "the file has no rows"),
    ("row_not_object", rows(TMWPL_ROW, ["q", "c"]), 2, "a row must be a JSON object, got array"),
    ("unknown_format", rows({"text": "q", "label": "c"}), 1, "unknown row format"),
    ("mixed_formats", rows(TMWPL_ROW, PMTD_ROW), 2, "a PMTD row in a file of TMWPL rows (line 1)"),
    ("empty_question", rows({"question": "  ", "class": "c"}), 1, "question: must not be empty"),
    ("question_not_string", rows({"question": 12, "class": "c"}), 1, "question: must be a string, got number"),
    ("lone_surrogate", '{"question": "a\\ud800", "class": "c"}\n', 1, "question: contains an unpaired surrogate"),
    ("missing_label", rows(TMWPL_ROW, {"question": "q"}), 2, "class: missing"),
    ("label_not_string", rows({"question": "q", "class": 3}), 1, "class: must be a string, got number"),
    ("label_list", rows({"question": "q", "class": ["a"]}), 1, "class: must be a string, got array"),
    ("empty_label", rows({"question": "q", "class": ""}), 1, "class: must not be empty"),
    (
        "id_wrong_type",
        rows({"id": [1], "question": "q", "class": "c"}),
        1,
        "id: must be a non-empty string or an integer",
    ),
    (
        "duplicate_id",
        rows({"id": "a", **TMWPL_ROW}, {"id": "b", **TMWPL_ROW}, {"id": "a", **TMWPL_ROW}),
        3,
        "duplicate id 'a' (first on line 1)",
    ),
    ("empty_dialog_content", rows({**PMTD_ROW, "dialog_content": ""}), 1, "dialog_content: must not be empty"),
    ("history_not_list", rows({**PMTD_ROW, "dialog_history": "u"}), 1, "dialog_history: must be a non-empty array"),
    ("history_empty", rows({**PMTD_ROW, "dialog_history": []}), 1, "dialog_history: must be a non-empty array"),
    (
        "history_bad_speaker",
        rows({**PMTD_ROW, "dialog_history": [{"student": "u"}, {"parent": "x"}]}),
        1,
        "dialog_history[1]: must be an object with one key",
    ),
    (
        "history_text_not_string",
        rows({**PMTD_ROW, "dialog_history": [{"teacher": None}]}),
        1,
        "dialog_history[0]: teacher: must be a string, got null",
    ),
    ("conversation_not_list", rows({"conversation": "q", "label": "c"}), 1, "conversation: must be a non-empty array"),
    (
        "conversation_turn_not_object",
        rows({"conversation": ["q"], "label": "c"}),
        1,
        "conversation[0]: must be an object",
    ),
    ("conversation_bad_role", rows(conversation(("human", "q"))), 1, "conversation[0].role: must be one of"),
    (
        "conversation_missing_content",
        rows({"conversation": [{"role": "user"}], "label": "c"}),
        1,
        "conversation[0]: content: missing",
    ),
    (
        "conversation_late_system",
        rows(conversation(("user", "q"), ("system", "s"))),
        1,
        "a system turn may only come first",
    ),
    ("conversation_no_user", rows(conversation(("system", "s"), ("assistant", "a"))), 1, "must end with a user turn"),
    (
        "conversation_label_not_string",
        rows({**conversation(("user", "q")), "label": 1}),
        1,
        "label: must be a string, got number",
    ),
]


@pytest.mark.parametrize(
    ("content", "line", "fragment"), [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES]
)
def test_bad_file_gives_one_line_error_naming_file_and_line(tmp_path, content, line, fragment):
    path = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(NCALError) as info:
        load_examples(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: ")
    assert fragment in message
    assert "\n" not in message


def test_missing_file_is_an_ncal_error(tmp_path):
    with pytest.raises(NCALError, match="cannot read"):
        load_examples(tmp_path / "nope.jsonl")


def test_label_set_is_sorted_and_needs_two_classes(tmp_path):
    examples = [Example(id=str(i), messages=[], label=label, where=f"f:{i}") for i, label in enumerate("bab")]
    assert label_set(examples, "f") == ["a", "b"]
    with pytest.raises(NCALError, match=r"^train\.jsonl: classification needs at least 2 classes, found \['a'\]$"):
        label_set([example for example in examples if example.label == "a"], "train.jsonl")


def test_eval_label_outside_training_labels_names_its_line(tmp_path):
    path = write(tmp_path / "test.jsonl", rows({"question": "q", "class": "a"}, {"question": "r", "class": "z"}))
    with pytest.raises(NCALError) as info:
        check_labels(load_examples(path), ["a", "b"], "train.jsonl")
    assert str(info.value) == f"{path}:2: class 'z' is not one of the training labels ['a', 'b'] (from train.jsonl)"


KEYS = st.sampled_from(
    [
        "id",
        "question",
        "class",
        "label",
        "conversation",
        "role",
        "content",
        "dialog_content",
        "dialog_history",
        "student",
        "teacher",
    ]
)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
    | st.sampled_from(["user", "system", "assistant"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS | st.text(max_size=3), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(JSON_VALUES, max_size=5), as_array=st.booleans(), require_labels=st.booleans())
def test_random_json_rows_load_or_raise_ncal_error(tmp_path, values, as_array, require_labels):
    text = json.dumps(values) if as_array else "\n".join(json.dumps(value) for value in values)
    path = write(tmp_path / "random.jsonl", text)
    try:
        examples = load_examples(path, require_labels=require_labels)
    except NCALError as err:
        assert str(err).startswith(str(path)) and "\n" not in str(err)
    else:
        assert examples and all(example.messages and example.messages[-1]["role"] == "user" for example in examples)


def test_dev_split_is_balanced_disjoint_and_fixed_by_seed(tmp_path):
    from ncal_core.data.rows import dev_split

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "question": f"q{i}", "class": "ab"[i % 5 == 0]}) + "\n"
                            for i in range(50)), encoding="utf-8")
    rows = load_examples(path)
    rest, dev = dev_split(rows, 0, path, per_class=3)
    assert sorted(e.label for e in dev) == ["a"] * 3 + ["b"] * 3
    assert {e.id for e in rest}.isdisjoint({e.id for e in dev}) and len(rest) + len(dev) == 50
    assert [e.id for e in dev_split(rows, 0, path, per_class=3)[1]] == [e.id for e in dev]
    assert [e.id for e in dev_split(rows, 1, path, per_class=3)[1]] != [e.id for e in dev]
    with pytest.raises(NCALError, match="--dev_per_class 10: class 'b' has only 10 rows"):
        dev_split(rows, 0, path, per_class=10)


@pytest.mark.parametrize("size, a, b", [(0.1, 4, 1), (0.5, 20, 5), (10, 8, 2), (0.01, 1, 1)])
def test_val_size_takes_each_class_in_proportion_and_at_least_one_row(tmp_path, size, a, b):
    from ncal_core.data.rows import dev_split

    path = tmp_path / "rows.jsonl"  # 40 rows of a, 10 of b
    path.write_text("".join(json.dumps({"id": str(i), "question": f"q{i}", "class": "ab"[i % 5 == 0]}) + "\n"
                            for i in range(50)), encoding="utf-8")
    rows = load_examples(path)
    rest, dev = dev_split(rows, 0, path, size=size)
    assert (sum(e.label == "a" for e in dev), sum(e.label == "b" for e in dev)) == (a, b)
    assert {e.id for e in rest}.isdisjoint({e.id for e in dev}) and len(rest) + len(dev) == 50
    with pytest.raises(NCALError, match="--val_size 0.95: class .b. has only 10 rows, too few to hold 10 out"):
        dev_split(rows, 0, path, size=0.95)
