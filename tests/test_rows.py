"""Loading rows: every format (TMWPL, PMTD, conversation, text/label columns in JSON, CSV and TSV, chat messages, alpaca,
sharegpt, datasets folders and cached ids), one file:line error per kind of bad input, and never a stray exception."""

from __future__ import annotations

import json
import sys
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


def test_json_array_items_are_placed_by_the_line_they_start_on_and_named_by_position(tmp_path):
    text = '[\n  {"question": "a", "class": "x"},\n\n  {"question": "b",\n   "class": "y"}\n]\n'
    examples = load_examples(write(tmp_path / "a.json", text))
    assert [e.where for e in examples] == [f"{tmp_path / 'a.json'}:2", f"{tmp_path / 'a.json'}:4"]
    assert [e.id for e in examples] == ["a:1", "a:2"]


def test_a_compact_json_array_loads_with_ids_by_position(tmp_path):
    """json.dump(rows, f) writes one line: the rows without an id are told apart by their place in the array."""
    rows = [{"question": "a", "class": "x"}, {"question": "b", "class": "y"}, {"id": "own", "question": "c",
                                                                             "class": "x"}]
    examples = load_examples(write(tmp_path / "a.json", json.dumps(rows)))
    assert [e.id for e in examples] == ["a:1", "a:2", "own"]
    assert [e.where for e in examples] == [f"{tmp_path / 'a.json'}:1 (item {n})" for n in (1, 2, 3)]
    with pytest.raises(NCALError, match=r"a\.json:1 \(item 2\): question: must be a string"):
        load_examples(write(tmp_path / "a.json", json.dumps([rows[0], {"question": 1, "class": "y"}])))


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
    ("unknown_format", rows({"body": "q", "label": "c"}), 1, "unknown row format"),
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
        "text",
        "messages",
        "conversations",
        "from",
        "value",
        "instruction",
        "input",
        "output",
    ]
)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
    | st.sampled_from(["user", "system", "assistant", "human", "gpt"]),
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


# The formats people's data comes in: text/label columns (JSON, CSV, TSV), chat messages, alpaca, sharegpt, datasets.


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def test_shipped_examples_and_tmwpl_load_exactly_as_before_the_new_formats(tmwpl_dir):
    """sha256 of every Example's fields, computed with rows.py as it was before CSV, chat, alpaca, sharegpt and
    datasets support (commit 3e6b1b8)."""
    import dataclasses
    import hashlib

    before = {
        EXAMPLES / "conversation.json": "16414535c47392b9e904eab6af47161252028bc676e28eaa6bbd9ac585f649e3",
        EXAMPLES / "pmtd_style.jsonl": "682ef8e932f6064bd9635a92d5f7c6600bacc3318a36a666c4e33ab73214de08",
        EXAMPLES / "tmwpl_style.jsonl": "66f54d42cf396d645ea99c8d156858eb12fb7e8a47d7d6fe61c21b96ff5c9dda",
        tmwpl_dir / "TMWPL_train.jsonl": "f8e9a6eeac5c865f03e5f10dbf286492309c5cc55d88d24624de920414f9ca26",
        tmwpl_dir / "TMWPL_test.jsonl": "9096634a982b2c5c800f5f5dc29eda31ceb151d72586247b8c51df752c620293",
    }
    for path, digest in before.items():
        examples = load_examples(path)
        if path.suffix == ".json":
            # a JSON array's rows are now named by their position in it (any layout loads), not by the line they
            # start on, which `where` still names; everything else is as it was
            assert [e.id for e in examples] == [f"{path.stem}:{n}" for n in range(1, len(examples) + 1)]
            examples = [dataclasses.replace(e, id=f"{path.stem}:{e.where.rsplit(':', 1)[1]}") for e in examples]
        # `where` named by the file's name, not its folder: the digests hold in any checkout
        fields = [dataclasses.astuple(dataclasses.replace(e, where=e.where.replace(str(path), path.name)))
                  for e in examples]
        assert hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode()).hexdigest() == digest, path.name


def test_jsonl_rows_in_no_other_format_read_the_text_and_label_columns(tmp_path):
    path = write(tmp_path / "t.jsonl", rows({"id": 7, "text": "q1", "label": "a"}, {"text": "q2", "label": "b"}))
    assert load_examples(path) == [
        Example(id="7", messages=[user("q1")], label="a", where=f"{path}:1"),
        Example(id="t:2", messages=[user("q2")], label="b", where=f"{path}:2"),
    ]
    named = write(tmp_path / "n.json", json.dumps([{"sentence": "q", "intent": "a"}]))
    assert load_examples(named, text_column="sentence", label_column="intent") == [
        Example(id="n:1", messages=[user("q")], label="a", where=f"{named}:1")
    ]


def test_a_known_format_wins_over_the_text_column(tmp_path):
    path = write(tmp_path / "k.jsonl", rows({"question": "q", "class": "c", "text": "t", "label": "l"}))
    assert load_examples(path) == [Example(id="k:1", messages=[user("q")], label="c", where=f"{path}:1")]


def test_csv_rows_are_named_by_the_line_each_record_starts_on(tmp_path):
    path = write(tmp_path / "r.csv", 'text,label,id\n"first\nline",a,x\n\nsecond,b,\nthird,,z\n')
    assert load_examples(path, require_labels=False) == [
        Example(id="x", messages=[user("first\nline")], label="a", where=f"{path}:2"),
        Example(id="r:5", messages=[user("second")], label="b", where=f"{path}:5"),
        Example(id="z", messages=[user("third")], label=None, where=f"{path}:6"),
    ]
    with pytest.raises(NCALError) as info:
        load_examples(path)
    assert str(info.value) == f"{path}:6: label: missing (every row needs a class here)"


def test_tsv_with_named_columns_a_byte_order_mark_and_crlf_lines(tmp_path):
    path = write(tmp_path / "r.tsv", '\ufeffintent\tsentence\r\nbook\tbook a flight\r\nother\t"a\ttab"\r\n')
    assert load_examples(path, text_column="sentence", label_column="intent") == [
        Example(id="r:2", messages=[user("book a flight")], label="book", where=f"{path}:2"),
        Example(id="r:3", messages=[user("a\ttab")], label="other", where=f"{path}:3"),
    ]


def test_csv_without_a_label_column_is_unlabeled_when_labels_are_optional(tmp_path):
    path = write(tmp_path / "p.csv", "text\nq\n")
    assert load_examples(path, require_labels=False) == [Example(id="p:2", messages=[user("q")], label=None,
                                                                 where=f"{path}:2")]


BAD_CSV = [
    ("no_text_column", "body,label\nq,c\n",
     "1: no column 'text' in the header (columns: ['body', 'label']); name the text column with --text_column"),
    ("no_label_column", "text,class\nq,c\n",
     "1: no column 'label' in the header (columns: ['text', 'class']); name the class column with --label_column"),
    ("too_few_fields", 'text,label\n"a\nb",c\nq\n', "4: 1 field, but the header (line 1) has 2"),
    ("too_many_fields", "\n\ntext,label\nq,c,d\n", "4: 3 fields, but the header (line 3) has 2"),
    ("column_twice", "text,label,text\nq,c,r\n", "1: column 'text' appears 2 times in the header"),
    ("empty_text", "text,label\n ,c\n", "2: text: must not be empty"),
    ("header_only", "text,label\n", " the file has no rows"),
    ("blank_file", "\n\n", " the file is empty"),
    ("not_utf8", b"text,label\nq,c\n\xff,c\n", "3: not UTF-8 text"),
    ("field_too_large", "text,label\nq,c\n" + "x" * 200_000 + ",c\n",
     "3: malformed CSV: field larger than field limit (131072)"),
]


def assert_refused(path, message: str) -> None:
    """load_examples(path) refuses it with exactly `path:message`."""
    with pytest.raises(NCALError) as info:
        load_examples(path)
    assert str(info.value) == f"{path}:{message}"


@pytest.mark.parametrize(("content", "message"), [case[1:] for case in BAD_CSV], ids=[case[0] for case in BAD_CSV])
def test_bad_csv_gives_one_exact_line(tmp_path, content, message):
    assert_refused(write(tmp_path / "bad.csv", content), message)


def test_bad_tsv_names_its_column_flag_too(tmp_path):
    path = write(tmp_path / "bad.tsv", "text\tclass\nq\tc\n")
    with pytest.raises(NCALError) as info:
        load_examples(path, text_column="sentence")
    assert str(info.value) == (f"{path}:1: no column 'sentence' in the header (columns: ['text', 'class']); name the "
                               "text column with --text_column")


def test_chat_messages_rows_the_last_assistant_turn_is_the_class(tmp_path):
    labeled = {"messages": [{"role": "system", "content": "分类"}, user("题目"), {"role": "assistant", "content": "回忆"}]}
    # a last turn that is the user's: a prompt to answer, earlier turns and all
    open_row = {"messages": [user("q1"), {"role": "assistant", "content": "x"}, user("q2")]}
    path = write(tmp_path / "m.jsonl", rows(labeled, open_row))
    assert load_examples(path, require_labels=False) == [
        Example(id="m:1", messages=[{"role": "system", "content": "分类"}, user("题目")], label="回忆", where=f"{path}:1"),
        Example(id="m:2", messages=[user("q1"), {"role": "assistant", "content": "x"}, user("q2")], label=None,
                where=f"{path}:2"),
    ]
    with pytest.raises(NCALError) as info:
        load_examples(path)
    assert str(info.value) == (f"{path}:2: messages: the class is missing: the last turn must be the assistant turn "
                               "(every row needs a class here)")


def test_alpaca_rows_the_instruction_and_input_are_the_user_turn(tmp_path):
    path = write(
        tmp_path / "a.jsonl",
        rows(
            {"instruction": "Classify the problem.", "input": "1+1=?", "output": "回忆"},
            {"instruction": "Say which.", "input": "", "output": "b"},
            {"instruction": "No input.", "output": "c"},
            {"instruction": "Unlabeled."},
        ),
    )
    assert load_examples(path, require_labels=False) == [
        Example(id="a:1", messages=[user("Classify the problem.\n\n1+1=?")], label="回忆", where=f"{path}:1"),
        Example(id="a:2", messages=[user("Say which.")], label="b", where=f"{path}:2"),
        Example(id="a:3", messages=[user("No input.")], label="c", where=f"{path}:3"),
        Example(id="a:4", messages=[user("Unlabeled.")], label=None, where=f"{path}:4"),
    ]


def test_sharegpt_rows_map_from_and_value_and_the_last_gpt_turn_is_the_class(tmp_path):
    row = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "c"}]}
    unlabeled = {"conversations": [{"from": "human", "value": "r"}]}
    path = write(tmp_path / "s.jsonl", rows(row, unlabeled))
    assert load_examples(path, require_labels=False) == [
        Example(id="s:1", messages=[{"role": "system", "content": "s"}, user("q")], label="c", where=f"{path}:1"),
        Example(id="s:2", messages=[user("r")], label=None, where=f"{path}:2"),
    ]
    with pytest.raises(NCALError) as info:
        load_examples(path)
    assert str(info.value) == (f"{path}:2: conversations: the class is missing: the last turn must be the gpt turn "
                               "(every row needs a class here)")


def chat(*turns: tuple[str, str], key: str = "messages", speaker: str = "role", content: str = "content") -> dict:
    """A chat-messages (or, with the keys, sharegpt) row from (speaker, text) pairs."""
    return {key: [{speaker: who, content: said} for who, said in turns]}


UNKNOWN = ("unknown row format: expected one of the fields 'conversation', 'messages', 'conversations', "
           "'dialog_content', 'question', 'instruction' or the text column 'text' (--text_column), got ")

# (case, file content, the exact message after "path:")
NEAR_MISSES = [
    ("sharegpt_with_role_content", rows(chat(("user", "q"), key="conversations")),
     ("1: conversations[0]: sharegpt rows need from/value, got the keys ['content', 'role']; role/content turns are "
      "chat messages, under 'messages'")),
    ("sharegpt_other_keys", rows(chat(("human", "q"), key="conversations", speaker="speaker", content="text")),
     "1: conversations[0]: sharegpt rows need from/value, got the keys ['speaker', 'text']"),
    ("messages_with_from_value", rows(chat(("human", "q"), speaker="from", content="value")),
     ("1: messages[0]: chat rows need role/content, got the keys ['from', 'value']; from/value turns are sharegpt's, "
      "under 'conversations'")),
    ("messages_without_content", rows({"messages": [{"role": "user"}]}),
     "1: messages[0]: chat rows need role/content, got the keys ['role']"),
    ("messages_bad_role", rows(chat(("human", "q"))),
     "1: messages[0].role: must be one of ['system', 'user', 'assistant'], got 'human'"),
    ("sharegpt_bad_from", rows(chat(("user", "q"), key="conversations", speaker="from", content="value")),
     "1: conversations[0].from: must be one of ['system', 'human', 'gpt'], got 'user'"),
    ("messages_not_list", rows({"messages": "q"}), "1: messages: must be a non-empty array of turns, got string"),
    ("messages_turn_not_object", rows({"messages": ["q"]}),
     "1: messages[0]: must be an object with 'role' and 'content', got string"),
    ("messages_late_system", rows(chat(("user", "q"), ("system", "s"), ("assistant", "a"))),
     "1: messages[1].role: a system turn may only come first"),
    ("messages_no_user", rows(chat(("system", "s"), ("assistant", "a"))),
     "1: messages: must end with a user turn (optionally followed by the answer)"),
    ("messages_empty_content", rows(chat(("user", " "), ("assistant", "a"))),
     "1: messages[0]: content: must not be empty"),
    ("alpaca_missing_output", rows({"instruction": "i"}), "1: output: missing (every row needs a class here)"),
    ("alpaca_input_not_string", rows({"instruction": "i", "input": 3, "output": "c"}),
     "1: input: must be a string, got number"),
    ("alpaca_without_instruction", rows({"input": "x", "output": "c"}),
     f"1: {UNKNOWN}['input', 'output']; alpaca rows need 'instruction'"),
    ("unknown_format", rows({"body": "q", "label": "c"}), f"1: {UNKNOWN}['body', 'label']"),
    ("text_label_not_string", rows({"text": "q", "label": 3}), "1: label: must be a string, got number"),
    ("text_missing_label", rows({"text": "q", "label": "c"}, {"text": "r"}),
     "2: label: missing (every row needs a class here)"),
    ("messages_in_tmwpl_file", rows(TMWPL_ROW, chat(("user", "q"), ("assistant", "c"))),
     "2: a chat messages row in a file of TMWPL rows (line 1)"),
    ("alpaca_in_text_file", rows({"text": "q", "label": "c"}, {"instruction": "i", "output": "c"}),
     "2: an alpaca row in a file of text/label rows (line 1)"),
    ("duplicate_id_in_messages", rows({"id": "a", **chat(("user", "q"), ("assistant", "c"))},
                                      {"id": "a", **chat(("user", "r"), ("assistant", "c"))}),
     "2: id: duplicate id 'a' (first on line 1)"),
]


@pytest.mark.parametrize(("content", "message"), [case[1:] for case in NEAR_MISSES],
                         ids=[case[0] for case in NEAR_MISSES])
def test_near_miss_gets_one_exact_line(tmp_path, content, message):
    assert_refused(write(tmp_path / "bad.jsonl", content), message)


def test_text_and_label_columns_must_differ(tmp_path):
    path = write(tmp_path / "t.jsonl", rows({"text": "q", "label": "c"}))
    with pytest.raises(NCALError) as info:
        load_examples(path, text_column="label")
    assert str(info.value) == "--label_column: names the same column as --text_column ('label')"


def test_infer_passes_its_column_and_split_flags_to_load_examples(tmp_path):
    from ncal_core.infer import InferConfig, _rows

    path = write(tmp_path / "p.csv", "sentence,intent\nq,\n")
    assert _rows(InferConfig(prompts_file=str(path), text_column="sentence", label_column="intent")) == [
        Example(id="p:2", messages=[user("q")], label=None, where=f"{path}:2")
    ]


@pytest.fixture
def hf_datasets():
    """Hugging Face `datasets` (an optional dependency; in the dev extra)."""
    return pytest.importorskip("datasets")


def test_datasets_folder_reads_the_split_asked_for(tmp_path, hf_datasets):
    folder = tmp_path / "saved"
    hf_datasets.DatasetDict({
        "train": hf_datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["x", "y"]}),
        "test": hf_datasets.Dataset.from_dict({"text": ["c"], "label": ["x"]}),
    }).save_to_disk(str(folder))
    assert load_examples(folder, dataset_split="test") == [
        Example(id="saved:0", messages=[user("c")], label="x", where=f"{folder}[test]:row 0")
    ]
    assert [(e.messages, e.label) for e in load_examples(folder, dataset_split="train")] == [
        ([user("a")], "x"), ([user("b")], "y")]
    for split, message in [
        (None, f"{folder}: the data set has the splits ['train', 'test']; choose one with --dataset_split"),
        ("validation", f"{folder}: no split 'validation' (splits: ['train', 'test']); choose one with --dataset_split"),
    ]:
        with pytest.raises(NCALError) as info:
            load_examples(folder, dataset_split=split)
        assert str(info.value) == message


def test_datasets_folder_of_one_split_with_class_label_names(tmp_path, hf_datasets):
    folder = tmp_path / "one"
    features = hf_datasets.Features({"sentence": hf_datasets.Value("string"),
                                     "label": hf_datasets.ClassLabel(names=["neg", "pos"])})
    hf_datasets.Dataset.from_dict({"sentence": ["good", "bad", "meh"], "label": [1, 0, -1]},
                                  features=features).save_to_disk(str(folder))
    # one split saved alone is read whatever --dataset_split says; -1 is datasets' "no label"
    assert load_examples(folder, require_labels=False, text_column="sentence", dataset_split="test") == [
        Example(id="one:0", messages=[user("good")], label="pos", where=f"{folder}:row 0"),
        Example(id="one:1", messages=[user("bad")], label="neg", where=f"{folder}:row 1"),
        Example(id="one:2", messages=[user("meh")], label=None, where=f"{folder}:row 2"),
    ]
    with pytest.raises(NCALError) as info:
        load_examples(folder, text_column="sentence")
    assert str(info.value) == f"{folder}:row 2: label: missing (every row needs a class here)"


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([chat(("system", "s"), ("user", "q"), ("assistant", "c"))], [([{"role": "system", "content": "s"}, user("q")],
                                                                       "c")]),
        ([{"instruction": "i", "input": "", "output": "c"}, {"instruction": "j", "input": "x", "output": "d"}],
         [([user("i")], "c"), ([user("j\n\nx")], "d")]),
        ([chat(("human", "q"), ("gpt", "c"), key="conversations", speaker="from", content="value")],
         [([user("q")], "c")]),
    ],
    ids=["messages", "alpaca", "sharegpt"],
)
def test_datasets_rows_follow_the_same_formats(tmp_path, hf_datasets, records, expected):
    folder = tmp_path / "d"
    hf_datasets.Dataset.from_list(records).save_to_disk(str(folder))
    assert [(e.messages, e.label) for e in load_examples(folder)] == expected


def test_bad_datasets_row_is_named_by_its_index(tmp_path, hf_datasets):
    folder = tmp_path / "d"
    hf_datasets.DatasetDict({"train": hf_datasets.Dataset.from_dict({"text": ["a", " "], "label": ["x", "y"]})}
                            ).save_to_disk(str(folder))
    with pytest.raises(NCALError) as info:
        load_examples(folder, dataset_split="train")
    assert str(info.value) == f"{folder}[train]:row 1: text: must not be empty"


def test_dataset_id_is_read_from_the_datasets_cache(tmp_path, hf_datasets, monkeypatch):
    from datasets.packaged_modules.json.json import Json

    train = write(tmp_path / "train.jsonl", rows({"text": "a", "label": "x"}, {"text": "b", "label": "y"}))
    test = write(tmp_path / "test.jsonl", rows({"text": "c", "label": "x"}))
    # Laid out as load_dataset("someone/toy") leaves a hub data set: someone___toy/default/0.0.0/<hash>/toy-<split>.arrow
    Json(cache_dir=str(tmp_path / "build"), dataset_name="toy", config_id="default", hash="0123abcd",
         data_files={"train": str(train), "test": str(test)}).download_and_prepare()
    cache = tmp_path / "cache"
    cache.mkdir()
    (tmp_path / "build" / "toy").rename(cache / "someone___toy")
    monkeypatch.setattr(hf_datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.chdir(tmp_path)  # where "someone/toy" is no file
    assert load_examples("someone/toy", dataset_split="test") == [
        Example(id="toy:0", messages=[user("c")], label="x", where="someone/toy[test]:row 0")
    ]
    assert [e.label for e in load_examples("someone/toy", dataset_split="train")] == ["x", "y"]
    with pytest.raises(NCALError) as info:
        load_examples("someone/other", dataset_split="train")
    assert str(info.value) == f"someone/other: no such file, and not a data set in the datasets cache {cache}"


def test_datasets_without_the_package_say_how_to_install_it(tmp_path, monkeypatch):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text('{"splits": ["train"]}', encoding="utf-8")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails as when it is not installed
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NCALError) as info:
        load_examples(folder)
    assert str(info.value) == (f"{folder}: reading a folder saved with save_to_disk needs the datasets package "
                               "(pip install datasets)")
    with pytest.raises(NCALError) as info:
        load_examples("someone/toy")
    assert str(info.value) == ("someone/toy: no such file, and reading it as a dataset id from the datasets cache "
                               "needs the datasets package (pip install datasets)")


def test_a_folder_that_is_no_saved_data_set_is_refused(tmp_path):
    with pytest.raises(NCALError) as info:
        load_examples(tmp_path)
    assert str(info.value) == (f"{tmp_path}: a folder, but not a data set saved with datasets' save_to_disk (it has "
                               "no dataset_dict.json or state.json)")


def test_the_one_row_examples_of_data_readme_load(tmp_path):
    readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    jsonl = readme.split("```jsonl\n", 1)[1].split("```", 1)[0].splitlines()
    prompt = [{"role": "system", "content": "Classify."}, user("3 + 4 = ?")]
    expected = [
        (prompt, "recall"),
        (prompt, "recall"),
        (prompt, "recall"),
        ([user("Teacher: What is 3 + 4?\nStudent (utterance to classify): Seven.")], "R-SR"),
        ([user("3 + 4 = ?")], "recall"),
        ([user("Classify the problem.\n\n3 + 4 = ?")], "recall"),
        ([user("3 + 4 = ?")], "recall"),
    ]
    loaded = [load_examples(write(tmp_path / f"{i}.jsonl", line + "\n"))[0] for i, line in enumerate(jsonl)]
    assert [(e.messages, e.label) for e in loaded] == expected
    csv_text = readme.split("```csv\n", 1)[1].split("```", 1)[0]
    path = write(tmp_path / "readme.csv", csv_text)
    assert load_examples(path) == [
        Example(id="q1", messages=[user("3 + 4 = ?")], label="recall", where=f"{path}:2"),
        Example(id="q2", messages=[user("Anna has 3 apples\nand buys 4. How many now?")], label="model",
                where=f"{path}:3"),
    ]
