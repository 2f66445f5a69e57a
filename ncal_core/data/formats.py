"""Row formats: how one row (a JSON object, a CSV record or a datasets row) becomes chat turns and a class name.

Each format is named by a field that identifies it; `formats` lists them in the order a row is matched against
them, the text/label columns last. Every error is one line naming where the row is and the field at fault.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ncal_core.errors import NCALError, at

ROLES = ("system", "user", "assistant")
_SPEAKERS = {"student": "Student", "teacher": "Teacher"}
_SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
_CHAT_ROLES = {role: role for role in ROLES}


def kind(value: object) -> str:
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


def text(row: dict, field: str, where: str) -> str:
    """A required non-empty string field that can be encoded as UTF-8."""
    if field not in row:
        raise NCALError(f"{at(where, field=field)}: missing")
    value = row[field]
    if not isinstance(value, str):
        raise NCALError(f"{at(where, field=field)}: must be a string, got {kind(value)}")
    if not value.strip():
        raise NCALError(f"{at(where, field=field)}: must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON escapes can smuggle in lone surrogates, which the tokenizer would reject much later.
        raise NCALError(f"{at(where, field=field)}: contains an unpaired surrogate (\\ud800-\\udfff escape)") from None
    return value


def label(row: dict, field: str, where: str, require: bool) -> str | None:
    """The row's class name, or None for an unlabeled row when labels are optional."""
    if row.get(field) is None:
        if require:
            raise NCALError(f"{at(where, field=field)}: missing (every row needs a class here)")
        return None
    return text(row, field, where)


Read = Callable[[dict, str, bool], tuple[list[dict], str | None]]


def _question(row: dict, where: str, require: bool) -> tuple[list[dict], str | None]:
    """TMWPL: the question is the one user turn; `class` is the class."""
    return [{"role": "user", "content": text(row, "question", where)}], label(row, "class", where, require)


def _marked_turn(texts: list[str], utterance: str) -> int | None:
    """Index of the turn that is the utterance; the one nearest the window's centre when it repeats."""
    matches = [i for i, turn in enumerate(texts) if turn == utterance]
    centre = (len(texts) - 1) / 2
    return min(matches, key=lambda i: (abs(i - centre), i)) if matches else None


def _dialog(row: dict, where: str, require: bool) -> tuple[list[dict], str | None]:
    """PMTD: the window of turns as a transcript with speaker names and the utterance to classify marked."""
    utterance = text(row, "dialog_content", where)
    history = row.get("dialog_history")
    if not isinstance(history, list) or not history:
        raise NCALError(
            f"{at(where, field='dialog_history')}: must be a non-empty array of turns, got {kind(history)}"
        )
    speakers, texts = [], []
    for i, turn in enumerate(history):
        field = f"dialog_history[{i}]"
        if not isinstance(turn, dict) or len(turn) != 1 or next(iter(turn)) not in _SPEAKERS:
            raise NCALError(f"{at(where, field=field)}: must be an object with one key, 'student' or 'teacher'")
        (speaker,) = turn
        speakers.append(_SPEAKERS[speaker])
        texts.append(text(turn, speaker, at(where, field=field)))
    marked = _marked_turn(texts, utterance)
    lines = [
        f"{speaker} (utterance to classify): {turn}" if i == marked else f"{speaker}: {turn}"
        for i, (speaker, turn) in enumerate(zip(speakers, texts, strict=True))
    ]
    if marked is None:
        # The window should contain the utterance; if it does not, show it after the context rather than lose it.
        lines.append(f"(utterance to classify): {utterance}")
    return [{"role": "user", "content": "\n".join(lines)}], label(row, "class", where, require)


def _conversation(row: dict, where: str, require: bool) -> tuple[list[dict], str | None]:
    """The reference's format: the turns as given, minus a final assistant turn (the answer); `label` is the class."""
    conversation = row["conversation"]
    if not isinstance(conversation, list) or not conversation:
        raise NCALError(
            f"{at(where, field='conversation')}: must be a non-empty array of turns, got {kind(conversation)}"
        )
    messages = []
    for i, turn in enumerate(conversation):
        field = f"conversation[{i}]"
        if not isinstance(turn, dict):
            raise NCALError(f"{at(where, field=field)}: must be an object with 'role' and 'content', got {kind(turn)}")
        role = turn.get("role")
        if role not in ROLES:
            raise NCALError(f"{at(where, field=field + '.role')}: must be one of {list(ROLES)}, got {role!r}")
        if role == "system" and i > 0:
            raise NCALError(f"{at(where, field=field + '.role')}: a system turn may only come first")
        messages.append({"role": role, "content": text(turn, "content", at(where, field=field))})
    if messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages or messages[-1]["role"] != "user":
        raise NCALError(
            f"{at(where, field='conversation')}: must end with a user turn (optionally followed by the answer)"
        )
    return messages, label(row, "label", where, require)


@dataclass(frozen=True)
class _Turns:
    """A list of chat turns under `field`: the keys of a turn's speaker and text, and the speakers' roles."""

    field: str
    speaker: str
    content: str
    roles: dict[str, str]  # speaker as written -> system/user/assistant
    rows: str  # what such rows are called in a hint
    other: str  # the hint when a turn has the other list format's keys


_MESSAGES = _Turns("messages", "role", "content", _CHAT_ROLES, "chat", "from/value turns are sharegpt's, under "
                   "'conversations'")
_SHAREGPT = _Turns("conversations", "from", "value", _SHAREGPT_ROLES, "sharegpt", "role/content turns are chat "
                   "messages, under 'messages'")


def _turns(spec: _Turns) -> Read:
    """Chat turns (messages or sharegpt): a final assistant turn is the class, the turns before it the prompt."""

    def read(row: dict, where: str, require: bool) -> tuple[list[dict], str | None]:
        turns = row[spec.field]
        if not isinstance(turns, list) or not turns:
            raise NCALError(f"{at(where, field=spec.field)}: must be a non-empty array of turns, got {kind(turns)}")
        messages = []
        for i, turn in enumerate(turns):
            field = f"{spec.field}[{i}]"
            if not isinstance(turn, dict):
                raise NCALError(f"{at(where, field=field)}: must be an object with '{spec.speaker}' and "
                                f"'{spec.content}', got {kind(turn)}")
            if spec.speaker not in turn or spec.content not in turn:
                other = _SHAREGPT if spec is _MESSAGES else _MESSAGES
                hint = f"; {spec.other}" if other.speaker in turn and other.content in turn else ""
                raise NCALError(f"{at(where, field=field)}: {spec.rows} rows need {spec.speaker}/{spec.content}, "
                                f"got the keys {sorted(turn)}{hint}")
            speaker = turn[spec.speaker]
            role = spec.roles.get(speaker) if isinstance(speaker, str) else None
            if role is None:
                raise NCALError(f"{at(where, field=f'{field}.{spec.speaker}')}: must be one of {list(spec.roles)}, "
                                f"got {speaker!r}")
            if role == "system" and i > 0:
                raise NCALError(f"{at(where, field=f'{field}.{spec.speaker}')}: a system turn may only come first")
            messages.append({"role": role, "content": text(turn, spec.content, at(where, field=field))})
        answer = None
        if messages[-1]["role"] == "assistant":
            answer = messages.pop()["content"]
        elif require:
            assistant = next(k for k, v in spec.roles.items() if v == "assistant")
            raise NCALError(f"{at(where, field=spec.field)}: the class is missing: the last turn must be the "
                            f"{assistant} turn (every row needs a class here)")
        if not messages or messages[-1]["role"] != "user":
            raise NCALError(f"{at(where, field=spec.field)}: must end with a user turn (optionally followed by the "
                            "answer)")
        return messages, answer

    return read


def _alpaca(row: dict, where: str, require: bool) -> tuple[list[dict], str | None]:
    """alpaca: the instruction, then a blank line and the input when there is one, as the user turn; `output` is
    the class."""
    prompt = text(row, "instruction", where)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise NCALError(f"{at(where, field='input')}: must be a string, got {kind(extra)}")
    if extra and extra.strip():
        prompt += "\n\n" + text(row, "input", where)
    return [{"role": "user", "content": prompt}], label(row, "output", where, require)


def _columns(text_column: str, label_column: str) -> Read:
    """A text and a label column: the text as the one user turn."""

    def read(row: dict, where: str, require: bool) -> tuple[list[dict], str | None]:
        return [{"role": "user", "content": text(row, text_column, where)}], label(row, label_column, where, require)

    return read


@dataclass(frozen=True)
class Format:
    """A row format: its name, the field that identifies it, and how a row becomes its turns and class."""

    name: str
    key: str
    read: Read


def formats(text_column: str = "text", label_column: str = "label") -> tuple[Format, ...]:
    """The formats a row is matched against, in order: the first whose field the row has is the row's."""
    return (
        Format("conversation", "conversation", _conversation),
        Format("chat messages", "messages", _turns(_MESSAGES)),
        Format("sharegpt", "conversations", _turns(_SHAREGPT)),
        Format("PMTD", "dialog_content", _dialog),
        Format("TMWPL", "question", _question),
        Format("alpaca", "instruction", _alpaca),
        columns_format(text_column, label_column),
    )


def columns_format(text_column: str, label_column: str) -> Format:
    """The text/label columns format (the only one of CSV and TSV files)."""
    return Format("text/label", text_column, _columns(text_column, label_column))


def row_format(row: dict, where: str, known: tuple[Format, ...]) -> Format:
    """The format a row is in, from the fields it has."""
    for row_format in known:
        if row_format.key in row:
            return row_format
    *fields, columns = known
    keys = ", ".join(repr(f.key) for f in fields)
    hint = "; alpaca rows need 'instruction'" if "output" in row or "input" in row else ""
    raise NCALError(f"{where}: unknown row format: expected one of the fields {keys} or the text column "
                    f"{columns.key!r} (--text_column), got {sorted(row)}{hint}")
