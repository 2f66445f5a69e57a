"""A second long-tailed training set from TMWPL train: another head class and a steeper tail.

    python -m bench.resplit --out DIR        # writes DIR/train.jsonl (2,547 rows) and DIR/test.jsonl

The project may not ship PMTD, and a default must not be tuned to one prior. This keeps TMWPL's questions and
its balanced test split but redraws the training prior: the classes in ORDER get n_i = HEAD * RATIO^(-i / 6)
rows (1,233 down to 25, imbalance 50 against TMWPL's 30), drawn by SEED without replacement. TMWPL's head class
(回忆, 4,995 rows) becomes the fourth, with 174. The files are derived at run time and never committed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

from ncal_core.data.registry import resolve_dataset

ORDER = ["选取策略", "识别", "表征建模", "回忆", "过程实施", "推断", "分析"]
HEAD, RATIO, SEED = 1233, 50.0, 0


def class_sizes() -> dict[str, int]:
    """Rows per class of the re-split, in ORDER."""
    return {label: round(HEAD * RATIO ** (-i / (len(ORDER) - 1))) for i, label in enumerate(ORDER)}


def resplit(rows: list[dict]) -> list[dict]:
    """The re-split's training rows: class_sizes() of each class, drawn by SEED, in the file's order."""
    by_class: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_class.setdefault(row["class"], []).append(i)
    if set(by_class) != set(ORDER):
        raise SystemExit(f"expected TMWPL's classes {ORDER}, found {sorted(by_class)}")
    rng = random.Random(SEED)
    keep = set()
    for label, size in class_sizes().items():
        if len(by_class[label]) < size:
            raise SystemExit(f"class {label} has {len(by_class[label])} rows, fewer than the {size} wanted")
        keep.update(rng.sample(by_class[label], size))
    return [row for i, row in enumerate(rows) if i in keep]


def write(out: Path) -> tuple[Path, Path]:
    """DIR/train.jsonl (the re-split) and DIR/test.jsonl (TMWPL test as it is)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = resolve_dataset("tmwpl", "train").read_text(encoding="utf-8").splitlines()
    rows = resplit([json.loads(line) for line in lines if line.strip()])
    train, test = out / "train.jsonl", out / "test.jsonl"
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    shutil.copyfile(resolve_dataset("tmwpl", "test"), test)
    return train, test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    train, test = write(parser.parse_args(argv).out)
    print(f"wrote {train} ({sum(class_sizes().values())} rows: "
          + ", ".join(f"{k} {v}" for k, v in class_sizes().items()) + f") and {test}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
