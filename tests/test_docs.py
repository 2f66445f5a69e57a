"""README.md stays a page, docs/ is what bench/make_docs.py writes now, and every link opens inside the repository."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from bench import make_docs
from ncal_core.analyze import AnalyzeConfig
from ncal_core.export import ExportConfig
from ncal_core.infer import InferConfig
from ncal_core.serve import ServeConfig
from ncal_core.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


@pytest.mark.parametrize("name", list(make_docs.PAGES))
def test_generated_page_is_what_make_docs_writes_now(name):
    written = (REPO / name).read_text(encoding="utf-8")
    assert written == make_docs.PAGES[name](), f"{name} is stale: run `python -m bench.make_docs`"


@pytest.mark.parametrize("config", [TrainConfig, InferConfig, AnalyzeConfig, ExportConfig, ServeConfig])
def test_every_flag_is_in_flags_md_with_its_default(config):
    page = make_docs.flags_page()
    for field in dataclasses.fields(config):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        text = "—" if default is None else "`" + (
            ",".join(default) if isinstance(default, list) else str(default).lower() if isinstance(default, bool)
            else str(default)) + "`"
        assert f"| `--{field.name}` | {text} |" in page, field.name


def test_readme_is_one_page():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    headings = re.findall(r"^#+\s+(.+?)\s*$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_link_opens_a_file_of_the_repository(page):
    for target in _links(page):
        assert "://" not in target and not target.startswith("mailto:"), f"{page.name}: {target} leaves the repository"
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.is_relative_to(REPO), f"{page.name}: {target} points outside the repository"
        assert file.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in _anchors(file), f"{page.name}: no heading for #{anchor} in {file.name}"


def test_link_check_sees_a_link_that_leaves_the_repository(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("See [the spec](../shared/METHOD.md) and [paper](https://example.org).\n"
                    "```bash\n[not a link](nowhere.md)\n```\n## A heading, with `code`\n", encoding="utf-8")
    assert _links(page) == ["../shared/METHOD.md", "https://example.org"]
    assert _anchors(page) == {"a-heading-with-code"}


def test_a_results_folder_nobody_describes_stops_the_script(tmp_path, monkeypatch):
    (tmp_path / "reproduce_new").mkdir()
    (tmp_path / "reproduce_new" / "results.json").write_text(json.dumps([]), encoding="utf-8")
    monkeypatch.setattr(make_docs, "RESULTS", tmp_path)
    with pytest.raises(SystemExit, match="reproduce_new.*EXPERIMENTS"):
        make_docs.results_page()


def test_check_names_a_stale_page_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(make_docs, "PAGES", {"docs/flags.md": lambda: "now\n"})
    monkeypatch.setattr(make_docs, "REPO", tmp_path)
    monkeypatch.setattr(make_docs, "DOCS", tmp_path / "docs")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "flags.md").write_text("before\n", encoding="utf-8")
    assert make_docs.main(["--check"]) == 1
    assert "docs/flags.md is stale: run python -m bench.make_docs" in capsys.readouterr().err
    assert (tmp_path / "docs" / "flags.md").read_text(encoding="utf-8") == "before\n"
    assert make_docs.main([]) == 0 and make_docs.main(["--check"]) == 0


def test_speed_page_lists_the_parts_of_a_recorded_gpu_check(tmp_path):
    assert "No GPU run is recorded" in make_docs.gpu_section(tmp_path / "gpu_check.json")
    record = {"device": "NVIDIA H100", "gpu_count": 1, "torch": "2.13.0", "started": "2026-12-08T00:00:00+00:00",
              "complete": True, "passed": False,
              "parts": {"cuda_tests": {"status": "passed", "seconds": 61.5},
                        "train_2proc": {"status": "skipped", "seconds": 0.0}}}
    (tmp_path / "gpu_check.json").write_text(json.dumps(record), encoding="utf-8")
    section = make_docs.gpu_section(tmp_path / "gpu_check.json")
    assert "on NVIDIA H100 (1 GPU, torch 2.13.0): complete, not passed" in section
    assert "| cuda_tests | passed | 61.5 |" in section and "| train_2proc | skipped | 0.0 |" in section


def test_screen_ranking_takes_a_method_once_and_orders_by_the_development_split(tmp_path, monkeypatch):
    def row(method: str, dev: float, test: float) -> dict:
        return {"method": method, "dev_macro_f1_mean": dev, "macro_f1_mean": test, "delta_vs_sft": [0.01, 0.0, 0.02]}

    folders = {"a": [row("sft", 0.9, 0.9), row("sft+LA", 0.6, 0.7), row("x+LA", 0.8, 0.6)],
               "b": [row("sft+LA", 0.99, 0.99), row("y+LA", 0.7, 0.8)]}
    for name, rows in folders.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(rows), encoding="utf-8")
    monkeypatch.setattr(make_docs, "RESULTS", tmp_path)
    page = make_docs._screen_ranking([make_docs.Experiment(n, n, "", "", "", screen=True) for n in folders])
    ranked = [line.split(" | ")[1] for line in page.splitlines() if line.startswith("| ") and "`" in line[:8]]
    assert ranked == ["`x+LA`", "`y+LA`", "`sft+LA`"]  # plain rows left out; b's sft+LA is a's run again
    assert "| 3 | `sft+LA` | 0.600 | 0.700 | – | – |" in page  # sft+LA is not compared with itself
    assert "Spearman correlation of their development and test macro-F1 is -0.50" in page


def test_train_flags_are_grouped_under_the_section_comments_of_their_dataclass():
    train = make_docs.flags_page().split("## `python -m ncal_core.infer`")[0]
    tc_section = train.split("### TC loss\n")[1].split("\n### ")[0]
    assert "| `--lambda_lc` |" in tc_section and "| `--pooling` |" in tc_section
    assert "| `--learning_rate` |" not in tc_section
