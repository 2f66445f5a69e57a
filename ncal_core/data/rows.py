"""Rows of a data file as chat examples, with file:line errors.

A data file is JSONL or one JSON array (rows in any format of `ncal_core.data.formats`), a CSV or TSV file with a
text and a label column, or a `datasets` data set: a folder saved with `save_to_disk` or a dataset id in the
`datasets` cache (read with the optional `datasets` package).
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ncal_core.cli import flag
from ncal_core.data.formats import Format, columns_format, formats, kind, row_format
from ncal_core.errors import NCALError, at

_WHITESPACE = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True)
class Example:
    """One row: the chat turns to render (never the answer), its class name and where it came from."""

    id: str  # the row's "id", else "<file stem>:<line>" (":<item>" in a JSON array, ":<row>" for a datasets row)
    messages: list[dict]  # [{"role", "content"}, ...]: an optional leading system turn, then user (and assistant) turns
    label: str | None
    where: str  # "path:line" ("path[split]:row N" for a datasets row), for error messages


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


def _read_text(path: Path) -> str:
    """The file's text (UTF-8, a byte-order mark dropped); NCALError when it cannot be read or holds nothing."""
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
    return text


@dataclass(frozen=True)
class _Row:
    """One row as read, before its format is known."""

    where: str  # "path:line", or "folder[split]:row N" for a datasets row
    ref: str  # "line N" or "row N", for messages that point back at this row
    default_id: str  # the id of a row that has none
    value: object


def _json_rows(path: Path) -> list[_Row]:
    """The rows of a JSONL file (named by line) or of a file holding one JSON array in any layout (named by position:
    item N, with its line; `path:line (item N)` where items share a line)."""
    text = _read_text(path)
    if not text.lstrip().startswith("["):
        return [_Row(at(path, line), f"line {line}", f"{path.stem}:{line}", value)
                for line, value in _jsonl_rows(path, text)]
    items = _json_array_rows(path, text)
    starts = Counter(line for line, _ in items)
    return [_Row(at(path, line) if starts[line] == 1 else f"{at(path, line)} (item {n})", f"item {n}",
                 f"{path.stem}:{n}", value) for n, (line, value) in enumerate(items, start=1)]


def _csv_rows(path: Path, delimiter: str, text_column: str, label_column: str, require_labels: bool) -> list[_Row]:
    """The records of a CSV/TSV file under its header row, each with the line it starts on; an empty label or id
    cell is no label or id."""
    kind_name = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    header: list[str] | None = None
    header_line = 0
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader, None)
        except csv.Error as err:
            raise NCALError(f"{at(path, reader.line_num)}: malformed {kind_name}: {err}") from None
        if cells is None:
            return rows
        if len(cells) <= 1 and not "".join(cells).strip():
            continue  # a blank line
        if header is None:
            header, header_line = cells, start
            for column in dict.fromkeys((text_column, label_column, "id")):
                if header.count(column) > 1:
                    raise NCALError(f"{at(path, start)}: column {column!r} appears {header.count(column)} times in "
                                    "the header")
            if text_column not in header:
                raise NCALError(f"{at(path, start)}: no column {text_column!r} in the header (columns: {header}); "
                                "name the text column with --text_column")
            if require_labels and label_column not in header:
                raise NCALError(f"{at(path, start)}: no column {label_column!r} in the header (columns: {header}); "
                                "name the class column with --label_column")
            continue
        if len(cells) != len(header):
            fields = f"{len(cells)} field" + ("" if len(cells) == 1 else "s")
            raise NCALError(f"{at(path, start)}: {fields}, but the header (line {header_line}) has {len(header)}")
        row: dict[str, str | None] = dict(zip(header, cells, strict=True))
        for column in (label_column, "id"):
            if column in row and not (row[column] or "").strip():
                row[column] = None
        rows.append(_Row(at(path, start), f"line {start}", f"{path.stem}:{start}", row))


_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
_TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_DATASET_FILES = ("dataset_dict.json", "state.json")  # what save_to_disk writes for a DatasetDict, a Dataset


def table_delimiter(path: Path) -> str | None:
    """The cell delimiter of a .csv or .tsv path (any case), None for any other."""
    return _TABLE_DELIMITERS.get(path.suffix.lower())


def text_column_flag():
    """The --text_column flag of every command that reads rows."""
    return flag("text", "the text column of CSV/TSV files and of rows (JSON or datasets) in none of the other formats")


def label_column_flag():
    """The --label_column flag of every command that reads rows."""
    return flag("label", "the class column of CSV/TSV files and of rows (JSON or datasets) in none of the other formats")


def prompts_split_flag():
    """The --dataset_split flag of the commands that read --prompts_file."""
    return flag("test", "the split read when --prompts_file is a datasets folder (save_to_disk) or a dataset id in the "
                        "datasets cache")


def is_dataset_id(name: str | Path) -> bool:
    """A name that is no file and reads as a dataset id (`name`, `owner/name`), not as a file path."""
    path = Path(name)
    return not path.exists() and path.suffix.lower() not in _FILE_SUFFIXES and bool(_DATASET_ID.fullmatch(str(path)))


def _is_dataset(path: Path) -> bool:
    """A folder (save_to_disk's), or a dataset id."""
    return path.is_dir() or is_dataset_id(path)


def _pick_split(name: str, splits: list[str], split: str | None) -> str:
    """The split to read: the one asked for, or the only one there is."""
    if split is None and len(splits) == 1:
        return splits[0]
    if split is None:
        raise NCALError(f"{name}: the data set has the splits {splits}; choose one with --dataset_split")
    if split not in splits:
        raise NCALError(f"{name}: no split {split!r} (splits: {splits}); choose one with --dataset_split")
    return split


def _cached_dataset(datasets, name: str, split: str | None):  # datasets: the optional module
    """A dataset id's split from the datasets cache alone (never the network), as datasets reads it offline."""
    from datasets.packaged_modules.cache.cache import Cache

    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()  # not the "found the latest cached configuration" warning
    try:
        builder = Cache(repo_id=name, dataset_name=name.split("/")[-1], version="auto", hash="auto")
    except ValueError as err:
        why = str(err).splitlines()[0] if str(err) else ""
        why = "" if why.startswith("Couldn't find cache") else f" ({why})"  # else: several configurations cached
        raise NCALError(f"{name}: no such file, and not a data set in the datasets cache "
                        f"{datasets.config.HF_DATASETS_CACHE}{why}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    chosen = _pick_split(name, list(builder.info.splits or ()), split)
    return builder.as_dataset(split=chosen), f"{name}[{chosen}]"


def _dataset_rows(path: Path, split: str | None, label_column: str) -> list[_Row]:
    """The rows of a save_to_disk folder or a cached dataset id, named `place:row N` (N as in `dataset[N]`); a
    ClassLabel label column gives its class names (-1: no label)."""
    name, folder = str(path), path.is_dir()
    if folder and not any((path / file).is_file() for file in _DATASET_FILES):
        raise NCALError(f"{at(path)}: a folder, but not a data set saved with datasets' save_to_disk (it has no "
                        f"{' or '.join(_DATASET_FILES)})")
    try:
        import datasets
    except ImportError:
        what = "reading a folder saved with save_to_disk" if folder else \
            "no such file, and reading it as a dataset id from the datasets cache"
        raise NCALError(f"{name}: {what} needs the datasets package (pip install datasets)") from None
    try:
        if not folder:
            table, place = _cached_dataset(datasets, name, split)
        elif isinstance(loaded := datasets.load_from_disk(name), datasets.DatasetDict):
            chosen = _pick_split(name, list(loaded), split)
            table, place = loaded[chosen], f"{name}[{chosen}]"
        else:  # one split saved alone: read whatever --dataset_split says
            table, place = loaded, name
        feature = table.features.get(label_column)
        names = feature.names if isinstance(feature, datasets.ClassLabel) else None
        records = table.to_list()
    except (OSError, ValueError, KeyError) as err:
        why = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        raise NCALError(f"{name}: cannot read the data set: {why}") from None
    if not records:
        raise NCALError(f"{place}: the data set has no rows")
    rows = []
    for index, record in enumerate(records):
        row = {key: value for key, value in record.items() if value is not None}  # arrow's null: the field is absent
        value = row.get(label_column)
        if names is not None and type(value) is int and -1 <= value < len(names):
            if value == -1:
                del row[label_column]
            else:
                row[label_column] = names[value]
        rows.append(_Row(f"{place}:row {index}", f"row {index}", f"{path.name}:{index}", row))
    return rows


def _article(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def load_examples(path: str | Path, *, require_labels: bool = True, text_column: str = "text",
                  label_column: str = "label", dataset_split: str | None = None) -> list[Example]:
    """Every row of a data file or data set as an Example; NCALError naming file, line and field for the first bad
    row.

    text_column/label_column: the columns of CSV/TSV files and of text/label rows (JSON or datasets);
    dataset_split: the split of a datasets folder or cached dataset id (default: its only split).
    """
    path = Path(path)
    if text_column == label_column:
        raise NCALError(f"--label_column: names the same column as --text_column ({label_column!r})")
    known: tuple[Format, ...] = formats(text_column, label_column)
    if _is_dataset(path):
        rows = _dataset_rows(path, dataset_split, label_column)
    elif delimiter := table_delimiter(path):
        rows = _csv_rows(path, delimiter, text_column, label_column, require_labels)
        known = (columns_format(text_column, label_column),)
    else:
        rows = _json_rows(path)
    if not rows:
        raise NCALError(f"{at(path)}: the file has no rows")
    first: tuple[Format, str] | None = None
    seen: dict[str, str] = {}
    examples = []
    for row in rows:
        if not isinstance(row.value, dict):
            raise NCALError(f"{row.where}: a row must be a JSON object, got {kind(row.value)}")
        row_fmt = row_format(row.value, row.where, known)
        if first is None:
            first = (row_fmt, row.ref)
        elif row_fmt is not first[0]:
            raise NCALError(f"{row.where}: {_article(row_fmt.name)} row in a file of {first[0].name} rows ({first[1]})")
        messages, label = row_fmt.read(row.value, row.where, require_labels)
        example_id = _example_id(row.value, row.default_id, row.where)
        if example_id in seen:
            raise NCALError(f"{at(row.where, field='id')}: duplicate id {example_id!r} (first on {seen[example_id]})")
        seen[example_id] = row.ref
        examples.append(Example(id=example_id, messages=messages, label=label, where=row.where))
    return examples


def label_set(examples: Iterable[Example], source: str | Path) -> list[str]:
    """The sorted class names of the labeled examples; NCALError when there are fewer than 2."""
    labels = sorted({example.label for example in examples if example.label is not None})
    if len(labels) < 2:
        raise NCALError(f"{at(source)}: classification needs at least 2 classes, found {labels}")
    return labels


def check_class_names(flag: str, names: list[str] | None) -> None:
    """Class names given by a flag: at least two, none repeated (an empty one the flag parser refuses)."""
    if names is None:
        return
    if len(names) < 2:
        raise NCALError(f"{flag}: needs at least 2 classes, got {names}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise NCALError(f"{flag}: names the class {', '.join(map(repr, repeated))} twice")


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
