"""Rows of a data file (TMWPL, PMTD or the reference's conversation format) as chat examples, with file:line errors."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ncal_core.errors import NCALError, at


@dataclass(frozen=True)
class Example:
    """One row: the chat turns to render (never the answer), its class name and where it came from."""

    id: str  # the row's "id", else "<file stem>:<line>"
    messages: list[dict]  # [{"role", "content"}, ...]: an optional leading system turn, then user (and assistant) turns
    label: str | None
    where: str  # "path:line", for error messages


_ROLES = ("system", "user", "assistant")
_SPEAKERS = {"student": "Student", "teacher": "Teacher"}
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _kind(value: object) -> str:
    """The JSON name of a value's type, for error messages."""
    names = {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        type(None): "null",
        int: "number",
        float: "number",
    }
    return names.get(type(value), type(value).__name__)


def _text(row: dict, field: str, where: str) -> str:
    """A required non-empty string field that can be encoded as UTF-8."""
    if field not in row:
        raise NCALError(f"{at(where, field=field)}: missing")
    value = row[field]
    if not isinstance(value, str):
        raise NCALError(f"{at(where, field=field)}: must be a string, got {_kind(value)}")
    if not value.strip():
        raise NCALError(f"{at(where, field=field)}: must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON escapes can smuggle in lone surrogates, which the tokenizer would reject much later.
        raise NCALError(f"{at(where, field=field)}: contains an unpaired surrogate (\\ud800-\\udfff escape)") from None
    return value


def _question_messages(row: dict, where: str) -> list[dict]:
    """TMWPL: the question is the one user turn."""
    return [{"role": "user", "content": _text(row, "question", where)}]


def _marked_turn(texts: list[str], utterance: str) -> int | None:
    """Index of the turn that is the utterance; the one nearest the window's centre when it repeats."""
    matches = [i for i, text in enumerate(texts) if text == utterance]
    centre = (len(texts) - 1) / 2
    return min(matches, key=lambda i: (abs(i - centre), i)) if matches else None


def _dialog_messages(row: dict, where: str) -> list[dict]:
    """PMTD: the window of turns as a transcript with speaker names and the utterance to classify marked."""
    utterance = _text(row, "dialog_content", where)
    history = row.get("dialog_history")
    if not isinstance(history, list) or not history:
        raise NCALError(
            f"{at(where, field='dialog_history')}: must be a non-empty array of turns, got {_kind(history)}"
        )
    speakers, texts = [], []
    for i, turn in enumerate(history):
        field = f"dialog_history[{i}]"
        if not isinstance(turn, dict) or len(turn) != 1 or next(iter(turn)) not in _SPEAKERS:
            raise NCALError(f"{at(where, field=field)}: must be an object with one key, 'student' or 'teacher'")
        (speaker,) = turn
        speakers.append(_SPEAKERS[speaker])
        texts.append(_text(turn, speaker, at(where, field=field)))
    marked = _marked_turn(texts, utterance)
    lines = [
        f"{speaker} (utterance to classify): {text}" if i == marked else f"{speaker}: {text}"
        for i, (speaker, text) in enumerate(zip(speakers, texts, strict=True))
    ]
    if marked is None:
        # The window should contain the utterance; if it does not, show it after the context rather than lose it.
        lines.append(f"(utterance to classify): {utterance}")
    return [{"role": "user", "content": "\n".join(lines)}]


def _conversation_messages(row: dict, where: str) -> list[dict]:
    """The reference's format: the turns as given, minus a final assistant turn (the answer)."""
    conversation = row["conversation"]
    if not isinstance(conversation, list) or not conversation:
        raise NCALError(
            f"{at(where, field='conversation')}: must be a non-empty array of turns, got {_kind(conversation)}"
        )
    messages = []
    for i, turn in enumerate(conversation):
        field = f"conversation[{i}]"
        if not isinstance(turn, dict):
            raise NCALError(f"{at(where, field=field)}: must be an object with 'role' and 'content', got {_kind(turn)}")
        role = turn.get("role")
        if role not in _ROLES:
            raise NCALError(f"{at(where, field=field + '.role')}: must be one of {list(_ROLES)}, got {role!r}")
        if role == "system" and i > 0:
            raise NCALError(f"{at(where, field=field + '.role')}: a system turn may only come first")
        messages.append({"role": role, "content": _text(turn, "content", at(where, field=field))})
    if messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages or messages[-1]["role"] != "user":
        raise NCALError(
            f"{at(where, field='conversation')}: must end with a user turn (optionally followed by the answer)"
        )
    return messages


@dataclass(frozen=True)
class _Format:
    """A row format: the field that identifies it, the field holding the class, and how its turns are built."""

    name: str
    key: str
    label_field: str
    messages: Callable[[dict, str], list[dict]]


_FORMATS = (
    _Format("conversation", "conversation", "label", _conversation_messages),
    _Format("PMTD", "dialog_content", "class", _dialog_messages),
    _Format("TMWPL", "question", "class", _question_messages),
)


def _row_format(row: dict, where: str) -> _Format:
    """The format a row is in, from the fields it has."""
    for row_format in _FORMATS:
        if row_format.key in row:
            return row_format
    keys = ", ".join(repr(f.key) for f in _FORMATS)
    raise NCALError(f"{where}: unknown row format: expected one of the fields {keys}, got {sorted(row)}")


def _label(row: dict, field: str, where: str, require: bool) -> str | None:
    """The row's class name, or None for an unlabeled row when labels are optional."""
    if row.get(field) is None:
        if require:
            raise NCALError(f"{at(where, field=field)}: missing (every row needs a class here)")
        return None
    return _text(row, field, where)


def _example_id(row: dict, default: str, where: str) -> str:
    """The row's id as a string, or the default when it has none."""
    value = row.get("id")
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise NCALError(f"{at(where, field='id')}: must be a non-empty string or an integer, got {value!r}")
    return value


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, object]]:
    """One JSON value per non-blank line, with its line number."""
    rows = []
    # Split on "\n" only: str.splitlines would also break at U+2028 inside a JSON string.
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            rows.append((line, json.loads(raw)))
        except json.JSONDecodeError as err:
            raise NCALError(f"{at(path, line)}: malformed JSON: {err.msg} (column {err.colno})") from None
        except RecursionError:
            raise NCALError(f"{at(path, line)}: malformed JSON: nested too deeply") from None
    return rows


def _json_array_rows(path: Path, text: str) -> list[tuple[int, object]]:
    """The items of a document that is one JSON array, each with the line it starts on."""
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        raise NCALError(f"{at(path, err.lineno)}: malformed JSON: {err.msg} (column {err.colno})") from None
    except RecursionError:
        raise NCALError(f"{at(path)}: malformed JSON: nested too deeply") from None
    # The document is valid, so walking it item by item cannot fail; the walk only recovers line numbers.
    decoder = json.JSONDecoder()
    rows = []
    pos = _WHITESPACE.match(text, text.index("[") + 1).end()
    while text[pos] != "]":
        value, end = decoder.raw_decode(text, pos)
        rows.append((text.count("\n", 0, pos) + 1, value))
        pos = _WHITESPACE.match(text, end).end()
        if text[pos] == ",":
            pos = _WHITESPACE.match(text, pos + 1).end()
    return rows


def _read_rows(path: Path) -> list[tuple[int, object]]:
    """The JSON values of a JSONL file or of a file holding one JSON array, with line numbers."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise NCALError(f"{at(path)}: cannot read: {err.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise NCALError(f"{at(path, line)}: not UTF-8 text") from None
    if not text.strip():
        raise NCALError(f"{at(path)}: the file is empty")
    if text.lstrip().startswith("["):
        return _json_array_rows(path, text)
    return _jsonl_rows(path, text)


def load_examples(path: str | Path, *, require_labels: bool = True) -> list[Example]:
    """Every row of a data file as an Example; NCALError naming file, line and field for the first bad row."""
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise NCALError(f"{at(path)}: the file has no rows")
    first_format, first_line = None, 0
    seen: dict[str, int] = {}
    examples = []
    for line, row in rows:
        where = at(path, line)
        if not isinstance(row, dict):
            raise NCALError(f"{where}: a row must be a JSON object, got {_kind(row)}")
        row_format = _row_format(row, where)
        if first_format is None:
            first_format, first_line = row_format, line
        elif row_format is not first_format:
            raise NCALError(
                f"{where}: a {row_format.name} row in a file of {first_format.name} rows (line {first_line})"
            )
        messages = row_format.messages(row, where)
        label = _label(row, row_format.label_field, where, require_labels)
        example_id = _example_id(row, f"{path.stem}:{line}", where)
        if example_id in seen:
            raise NCALError(f"{at(where, field='id')}: duplicate id {example_id!r} (first on line {seen[example_id]})")
        seen[example_id] = line
        examples.append(Example(id=example_id, messages=messages, label=label, where=where))
    return examples


def label_set(examples: Iterable[Example], source: str | Path) -> list[str]:
    """The sorted class names of the labeled examples; NCALError when there are fewer than 2."""
    labels = sorted({example.label for example in examples if example.label is not None})
    if len(labels) < 2:
        raise NCALError(f"{at(source)}: classification needs at least 2 classes, found {labels}")
    return labels


def check_labels(examples: Iterable[Example], labels: list[str], source: str | Path) -> None:
    """NCALError for the first example whose class is not among the training labels (from `source`)."""
    known = set(labels)
    for example in examples:
        if example.label is not None and example.label not in known:
            raise NCALError(
                f"{example.where}: class {example.label!r} is not one of the training labels {labels} (from {source})"
            )


def dev_split(examples: list[Example], seed: int, source: str | Path, *, per_class: int = 0,
              size: float = 0.0) -> tuple[list[Example], list[Example]]:
    """(rest, dev): rows held out of training as a development split, drawn by `seed`.

    per_class: that many rows of every class (a balanced split); else size: a fraction of the rows when below 1,
    a number of rows from 1 up, taken from every class in proportion to its rows and at least one of each.
    """
    by_class: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_class.setdefault(example.label, []).append(index)
    fraction = size if size < 1 else size / len(examples)
    flag = f"--dev_per_class {per_class}" if per_class else f"--val_size {size:g}"
    rng = random.Random(seed)
    held: set[int] = set()
    for label in sorted(by_class):
        rows = by_class[label]
        take = per_class or max(1, round(fraction * len(rows)))
        if len(rows) <= take:
            raise NCALError(f"{source}: {flag}: class {label!r} has only {len(rows)} rows, too few to hold {take} "
                            "out and train on the rest")
        held.update(rng.sample(rows, take))
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def class_counts(class_ids: Iterable[int], num_classes: int) -> list[int]:
    """Rows per class."""
    counts = [0] * num_classes
    for c in class_ids:
        counts[c] += 1
    return counts
