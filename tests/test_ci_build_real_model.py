""".ci/build_real_model, with a stand-in for the real build script: it removes only what it created (never a folder
a user put at $NCAL_REAL_MODEL), and CI runs at once build the folder once instead of deleting each other's build."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from real_model import FILES

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "build_real_model"

# writes a complete build into --out and logs each call; FAIL_BUILD=1 makes it fail half-way
FAKE_BUILDER = f"""
import os, sys, time
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--out") + 1])
with open(os.environ["BUILD_LOG"], "a") as log:
    log.write(str(out) + "\\n")
out.mkdir(parents=True, exist_ok=True)
(out / "model.safetensors").write_text("weights")
if os.environ.get("FAIL_BUILD"):
    sys.exit(1)
time.sleep(float(os.environ.get("BUILD_SECONDS", "0")))
for name in {FILES!r}:
    (out / name).write_text(name)
"""


def _start(tmp: Path, target: Path, **env: str) -> subprocess.Popen:
    builder = tmp / "builder.py"
    builder.write_text(FAKE_BUILDER)
    return subprocess.Popen([str(SCRIPT), str(builder)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "NCAL_REAL_MODEL": str(target),
                                            "BUILD_LOG": str(tmp / "builds.log"), **env})


def _run(tmp: Path, target: Path, **env: str) -> tuple[int, str]:
    proc = _start(tmp, target, **env)
    _, err = proc.communicate()
    return proc.returncode, err


def _builds(tmp: Path) -> list[str]:
    log = tmp / "builds.log"
    return log.read_text().splitlines() if log.exists() else []


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in FILES)


def test_a_folder_a_user_put_there_is_left_as_it_is(tmp_path):
    target = tmp_path / "cache" / "model"
    target.mkdir(parents=True)
    (target / "config.json").write_text("mine")
    (target / "notes.txt").write_text("mine")
    code, err = _run(tmp_path, target)
    assert code == 1 and _builds(tmp_path) == []
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"{target} exists but is not a complete build; not building over it" in lines[0]
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "notes.txt"]
    assert (target / "config.json").read_text() == "mine"


def test_a_build_goes_to_a_fresh_folder_and_is_moved_in_whole(tmp_path):
    parent = tmp_path / "cache"
    target = parent / "model"
    (parent / "model.partial").mkdir(parents=True)  # another run's build under the old fixed name
    (parent / "model.partial" / "x").write_text("theirs")
    assert _run(tmp_path, target) == (0, "")
    (built,) = _builds(tmp_path)
    assert Path(built).parent == parent and Path(built).name.startswith(".build.") and _complete(target)
    assert not Path(built).exists() and (parent / "model.partial" / "x").read_text() == "theirs"
    assert _run(tmp_path, target) == (0, "") and len(_builds(tmp_path)) == 1  # complete: not built again


def test_a_failed_build_leaves_nothing_that_looks_like_one(tmp_path):
    target = tmp_path / "cache" / "model"
    code, err = _run(tmp_path, target, FAIL_BUILD="1")
    assert code == 1 and f"building the real checkpoint into {target} failed" in err
    assert not target.exists() and [p.name for p in target.parent.iterdir() if p.name.startswith(".build.")] == []


def test_two_runs_at_once_build_once_and_both_find_the_folder_complete(tmp_path):
    target = tmp_path / "cache" / "model"
    runs = [_start(tmp_path, target, BUILD_SECONDS="1") for _ in range(2)]
    results = [(proc.wait(), proc.stderr.read()) for proc in runs]
    assert results == [(0, ""), (0, "")]
    assert len(_builds(tmp_path)) == 1 and _complete(target)


def test_ci_run_builds_through_the_script():
    assert ".ci/build_real_model ../shared/models/build_qwen_coder.py" in (REPO / ".ci" / "run").read_text()
