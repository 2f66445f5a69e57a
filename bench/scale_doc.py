"""Fill docs/scale.md's generated parts from bench/memory_model.py and bench/scale_check.py's JSON.

    python bench/scale_doc.py [--check]

Each part sits between `<!-- generated: COMMAND -->` and `<!-- end generated -->` and holds COMMAND's output;
--check exits 1 when the file differs from what it would write.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DOC = REPO / "docs" / "scale.md"
sys.path.insert(0, str(BENCH))

import memory_model  # noqa: E402
import scale_check  # noqa: E402

SCRIPTS = {"bench/memory_model.py": memory_model.main, "bench/scale_check.py": scale_check.main}
BLOCK = re.compile(r"(<!-- generated: python (\S+)(.*?) -->\n).*?(<!-- end generated -->)", re.S)


def output(script: str, args: str) -> str:
    """What `python SCRIPT ARGS` prints, run in this process from the repository root."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.chdir(REPO):
        SCRIPTS[script](shlex.split(args))
    return buffer.getvalue()


def render(text: str) -> str:
    """text with every generated part replaced by its command's output."""
    return BLOCK.sub(lambda m: m.group(1) + output(m.group(2), m.group(3)) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether docs/scale.md is up to date")
    args = parser.parse_args(argv)
    text = DOC.read_text(encoding="utf-8")
    new = render(text)
    if args.check:
        print("docs/scale.md is up to date" if new == text else "docs/scale.md is stale: run bench/scale_doc.py")
        return 0 if new == text else 1
    DOC.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
