"""Data sets by name (tmwpl, pmtd): found locally, or downloaded from the paper's repository and checked by sha256."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from ncal_core.data.rows import is_dataset_id
from ncal_core.durable import atomic_file, cache_root
from ncal_core.errors import NCALError, at

DATA_DIR_ENV = "NCAL_DATA_DIR"
DATA_URL_ENV = "NCAL_DATA_URL"
_CHUNK = 1 << 20


@functools.cache
def registry() -> dict:
    """The contents of data/datasets.json (shipped as package `ncal_data`): base URL, names, files, checksums."""
    # importlib.resources cannot read a namespace package under setuptools' editable finder, so look on its path.
    spec = importlib.util.find_spec("ncal_data")
    for folder in spec.submodule_search_locations if spec else []:
        path = Path(folder) / "datasets.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    raise FileNotFoundError("ncal_data/datasets.json is not installed; reinstall the package (pip install -e .)")


def default_search_dirs() -> list[Path]:
    """Folders searched before the cache: $NCAL_DATA_DIR, shared/data beside the checkout, ../shared/data from cwd."""
    dirs = [Path(os.environ[DATA_DIR_ENV]).expanduser()] if os.environ.get(DATA_DIR_ENV) else []
    return [*dirs, Path(__file__).resolve().parents[2] / "shared" / "data", Path.cwd().parent / "shared" / "data"]


def cache_dir() -> Path:
    """Where downloaded files go: the cache root's data/."""
    return cache_root() / "data"


def _fetch(url: str, out, name: str) -> str:
    """Stream url into the open file `out`; returns its sha256."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
    except OSError as err:
        raise NCALError(f"{url}: download failed ({getattr(err, 'reason', err)}); "
                        f"put {name} in ${DATA_DIR_ENV} instead") from None
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str) -> Path:
    """Fetch url to dest atomically, keeping it only if its sha256 matches."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(dest) as out:
            actual = _fetch(url, out, dest.name)
            if actual != sha256:  # raised inside: the download is dropped, not renamed into place
                raise NCALError(f"{url}: sha256 mismatch for {dest.name}: expected {sha256}, got {actual}")
    except OSError as err:  # the cache folder (network errors are NCALErrors by now)
        raise NCALError(f"{at(dest.parent)}: cannot write the download there: {err.strerror}") from None
    return dest


def resolve_dataset(name_or_path: str, split: str = "train", *, search_dirs: Sequence[Path] | None = None) -> Path:
    """An existing path as is; else a known name's split file, found locally or in the cache, or downloaded."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    known = registry()["datasets"]
    entry = known.get(name_or_path.lower())
    if entry is None and "/" in name_or_path and is_dataset_id(name_or_path):  # owner/name: in the datasets cache
        return path
    if entry is None:
        raise NCALError(f"{name_or_path}: no such file, and not a known data set name ({', '.join(known)})")
    if split not in entry["files"]:
        raise NCALError(f"{name_or_path}: unknown split {split!r} (known: {', '.join(entry['files'])})")
    file = entry["files"][split]
    dirs = default_search_dirs() if search_dirs is None else list(search_dirs)
    for folder in [*dirs, cache_dir()]:
        candidate = folder / file["name"]
        if candidate.is_file():
            return candidate
    base_url = os.environ.get(DATA_URL_ENV) or registry()["base_url"]
    return download(base_url.rstrip("/") + "/" + file["name"], cache_dir() / file["name"], file["sha256"])
