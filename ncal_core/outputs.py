"""Where a command writes, checked before it reads a model or scores a row.

An output may not be one of the command's inputs (the rows, a model folder), may not write over a file inside a data
set folder it reads, nor over a training run's or a model's own files (its records, weights, tokenizer and reports;
what a command wrote there before, such as predictions, it may write again), and its folder must exist or be
creatable and be writable. Each check fails as one NCALError naming the flag, so a mistake costs nothing and loses
nothing.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path

from ncal_core.errors import NCALError
from ncal_core.run_record import RUN_FILE

# what a tokenizer folder may hold (a run's own, saved by save_pretrained, else the base's)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
# files that make a folder a model's or a training run's (a run, a checkpoint, an export, a base checkpoint)
RECORD_FILES = (RUN_FILE, "config.json", "adapter_config.json", "metrics.jsonl", "trainer_state.json")
# the files of such a folder no output may replace: its records, weights, optimizer and RNG state, tokenizer, the
# run's reports and pictures, a model card
OWN_FILES = (*RECORD_FILES, *TOKENIZER_FILES, "*.safetensors", "*.safetensors.index.json", "*.bin", "*.pt",
             "generation_config.json", "eval.json", "dev_ids.json", "*.png", "after_training_error*.txt", "README.md")


def records_of(folder: Path) -> str | None:
    """What the folder holds the records of ("a training run", "a model"), None when neither."""
    if (folder / RUN_FILE).is_file() or (folder / "metrics.jsonl").is_file():
        return "a training run"
    if any((folder / name).is_file() for name in RECORD_FILES):
        return "a model"
    return None


def own_file(path: Path) -> bool:
    """Whether `path` is one of the files of a model's or a run's folder (whether or not it exists yet)."""
    return path.parent.is_dir() and records_of(path.parent) is not None and any(
        fnmatch(path.name, pattern) for pattern in OWN_FILES)


def _inside_data_folder(path: Path, given: Path) -> bool:
    """Whether `path` lies inside the input folder `given` and that folder is a data set (a model's or a run's folder
    keeps its own files by name, see own_file)."""
    return (given.is_dir() and records_of(given) is None
            and Path(os.path.realpath(given)) in Path(os.path.realpath(path)).parents)


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name one file or folder (through links and relative parts)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def writable_folder(flag: str, folder: Path, shown: Path | None = None) -> None:
    """Make `folder` (and its parents) and prove a file can be written there; NCALError naming the flag else."""
    shown = shown if shown is not None else folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-").close()
    except OSError as err:
        raise NCALError(f"{flag} {shown}: cannot write there ({err.strerror or err})") from None


def check_output_file(flag: str, path: str | Path, inputs: Iterable[tuple[str, str | Path | None]]) -> Path:
    """A file the command will write: not a folder, not an input file given as (flag, path) nor an existing file
    inside an input data set folder, not one of a model's or a run's own files; its folder made and writable."""
    out = Path(path)
    if out.is_dir():
        raise NCALError(f"{flag} {out}: is a folder; name a file")
    for input_flag, given in inputs:
        if given is not None and _same(out, Path(given)):
            raise NCALError(f"{flag} {out}: is the {input_flag} file; name another output file")
        if given is not None and out.exists() and _inside_data_folder(out, Path(given)):
            raise NCALError(f"{flag} {out}: a file of the {input_flag} folder {given}; name another output file")
    if own_file(out):
        raise NCALError(f"{flag} {out}: a file of {records_of(out.parent)} ({out.parent}); name another output file")
    writable_folder(flag, out.parent, out)
    return out


def check_output_dir(flag: str, path: str | Path, inputs: Iterable[tuple[str, str | Path | None]], *,
                     writes: Iterable[str], overwrite: bool) -> Path:
    """A folder the command writes the files `writes` into: not an input folder, none of those files an input, not a
    model's or a run's folder unless `overwrite` (--overwrite_output_dir); made and writable."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NCALError(f"{flag} {out}: exists and is not a folder")
    for input_flag, given in inputs:
        if given is None or not Path(given).exists():
            continue
        given = Path(given)
        if _same(out, given):
            raise NCALError(f"{flag} {out}: is {input_flag}; name another folder")
        if any(_same(out / name, given) for name in writes):
            raise NCALError(f"{flag} {out}: would write over the {input_flag} file {given}; name another folder")
        over = next((name for name in writes if (out / name).exists() and _inside_data_folder(out / name, given)),
                    None)
        if over:
            raise NCALError(f"{flag} {out}: would write over {out / over} of the {input_flag} folder {given}; name "
                            "another folder")
    holder = records_of(out) if out.is_dir() else None
    if holder and not overwrite:
        raise NCALError(f"{flag} {out}: holds the records of {holder}; name another folder, or pass "
                        "--overwrite_output_dir true to write over them")
    writable_folder(flag, out)
    return out


def check_new_folder(flag: str, path: str | Path) -> Path:
    """A folder the command creates whole: absent or empty, its parent made and writable."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NCALError(f"{flag} {out}: exists and is not an empty folder")
    writable_folder(flag, out.absolute().parent, out)
    return out
