"""Data set names: search order, checksum-verified download from a local HTTP server, atomic cache writes."""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ncal_core.data.registry import DATA_DIR_ENV, DATA_URL_ENV, default_search_dirs, registry, resolve_dataset
from ncal_core.durable import CACHE_DIR_ENV
from ncal_core.errors import NCALError

README = Path(__file__).resolve().parents[1] / "data" / "README.md"
SERVER_LIFETIME_S = 60


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves a folder without logging every request to stderr."""

    def log_message(self, message_format: str, *args: object) -> None:
        """Drop the access log."""


@pytest.fixture(autouse=True)
def direct_local_http(monkeypatch) -> None:
    """Reach 127.0.0.1 directly even where an HTTP proxy is configured."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture
def serve(tmp_path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1 for one test; the server also stops itself after a minute."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stopper = threading.Timer(SERVER_LIFETIME_S, server.shutdown)
    stopper.daemon = True
    stopper.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        stopper.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder for the test; returns where downloads land."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens, so any download from it fails at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_download_is_verified_cached_and_reused(tmwpl_dir, serve, cache, monkeypatch):
    folder, url = serve
    shutil.copy(tmwpl_dir / "TMWPL_test.jsonl", folder / "TMWPL_test.jsonl")
    monkeypatch.setenv(DATA_URL_ENV, url)
    path = resolve_dataset("tmwpl", "test", search_dirs=[])
    assert path == cache / "TMWPL_test.jsonl"
    assert path.read_bytes() == (tmwpl_dir / "TMWPL_test.jsonl").read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == ["TMWPL_test.jsonl"]
    monkeypatch.setenv(DATA_URL_ENV, closed_port_url())
    assert resolve_dataset("TMWPL", "test", search_dirs=[]) == path


def test_corrupted_download_gives_checksum_error_and_leaves_nothing(serve, cache, monkeypatch):
    folder, url = serve
    (folder / "TMWPL_test.jsonl").write_text('{"question": "tampered", "class": "x"}\n', encoding="utf-8")
    actual = hashlib.sha256((folder / "TMWPL_test.jsonl").read_bytes()).hexdigest()
    expected = registry()["datasets"]["tmwpl"]["files"]["test"]["sha256"]
    monkeypatch.setenv(DATA_URL_ENV, url)
    with pytest.raises(NCALError) as info:
        resolve_dataset("tmwpl", "test", search_dirs=[])
    message = str(info.value)
    assert "TMWPL_test.jsonl" in message and f"expected {expected}" in message and f"got {actual}" in message
    assert list(cache.iterdir()) == []


def test_unreachable_server_is_an_ncal_error_that_names_the_data_dir(cache, monkeypatch):
    monkeypatch.setenv(DATA_URL_ENV, closed_port_url())
    with pytest.raises(NCALError, match=re.escape(f"put PMTD_train.jsonl in ${DATA_DIR_ENV}")):
        resolve_dataset("pmtd", search_dirs=[])
    assert list(cache.iterdir()) == []


def test_ncal_data_dir_comes_before_the_shared_folder(tmp_path, cache, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "TMWPL_train.jsonl").write_text("mine\n", encoding="utf-8")
    monkeypatch.setenv(DATA_DIR_ENV, str(mine))
    assert default_search_dirs()[0] == mine
    assert resolve_dataset("tmwpl") == mine / "TMWPL_train.jsonl"


def test_search_dirs_are_tried_in_order_before_the_cache(tmp_path, cache):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (second, cache):
        folder.mkdir(parents=True)
        (folder / "PMTD_test.jsonl").write_text("x\n", encoding="utf-8")
    assert resolve_dataset("pmtd", "test", search_dirs=[first, second]) == second / "PMTD_test.jsonl"
    first.mkdir()
    (first / "PMTD_test.jsonl").write_text("x\n", encoding="utf-8")
    assert resolve_dataset("PMTD", "test", search_dirs=[first, second]) == first / "PMTD_test.jsonl"
    assert resolve_dataset("pmtd", "test", search_dirs=[]) == cache / "PMTD_test.jsonl"


def test_existing_path_is_returned_as_is(tmp_path):
    path = tmp_path / "tmwpl"
    path.write_text("x\n", encoding="utf-8")
    assert resolve_dataset(str(path)) == path


def test_unknown_name_or_split_is_an_ncal_error():
    with pytest.raises(NCALError, match="not a known data set name"):
        resolve_dataset("no-such-data-set")
    with pytest.raises(NCALError, match="unknown split 'dev'"):
        resolve_dataset("tmwpl", "dev")


def test_registry_checksums_match_the_readme_and_the_shared_files(tmwpl_dir):
    readme = README.read_text(encoding="utf-8")
    for entry in registry()["datasets"].values():
        for file in entry["files"].values():
            assert f"| {file['name']} |" in readme and file["sha256"] in readme
    for split in ("train", "test"):
        file = registry()["datasets"]["tmwpl"]["files"][split]
        assert hashlib.sha256((tmwpl_dir / file["name"]).read_bytes()).hexdigest() == file["sha256"]
