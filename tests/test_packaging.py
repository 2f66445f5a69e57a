"""The installed distribution: kernels ship as ncal_kernels and never shadow Hugging Face's `kernels` package."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_provides_no_top_level_kernels_module(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy(REPO / name, source / name)
    for name in ("ncal_core", "kernels", "data"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("ncal-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {name.split("/")[0] for name in names}
    assert "kernels" not in tops and "data" not in tops
    assert {"ncal_core", "ncal_kernels", "ncal_data"} <= tops
    # every module of every subpackage ships (a subpackage left out of pyproject.toml would be missing)
    modules = {p.relative_to(source).as_posix() for p in (source / "ncal_core").rglob("*.py")}
    assert len(modules) > 30 and modules <= names, sorted(modules - names)


def test_kernels_import_under_their_own_name_and_never_stand_for_hugging_faces_kernels(tmp_path):
    """transformers 5.25 and later install Hugging Face's `kernels` package; with it or without it, what
    transformers sees as `kernels` is that distribution or nothing, never the repository's kernels/ folder."""
    code = ("import importlib.metadata, importlib.util, json\n"
            "import ncal_kernels.pool_norm, ncal_kernels.etf_gram, ncal_data\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "try:\n"
            "    installed = importlib.metadata.version('kernels')\n"
            "except importlib.metadata.PackageNotFoundError:\n"
            "    installed = None\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(json.dumps({'available': is_kernels_available(), 'installed': installed,\n"
            "                  'locations': list(spec.submodule_search_locations or []) if spec else []}))\n")
    ours = (REPO / "kernels").resolve()
    # run from the repository root too, where the kernels/ folder sits on sys.path[0]
    for cwd in (tmp_path, REPO):
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
        seen = json.loads(out.stdout)
        assert seen["available"] == (seen["installed"] is not None), (cwd, seen)
        if seen["installed"] is not None:  # `import kernels` is Hugging Face's package, not a part of ours
            assert all(Path(p).resolve() != ours for p in seen["locations"]), (cwd, seen)
