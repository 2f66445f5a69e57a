"""Bad input and faults around a trained model: nothing a user wrote or trained is lost.

infer, analyze, export, serve and train's output checks run through tests/warm_commands.py (imports once, one forked child per command,
as `python -m` runs it) against one tiny trained run and broken copies of it. Each case ends in one `error:` line and
exit 2 (or succeeds), and afterwards every input file and every trained weight holds the bytes it held before. The end
of training runs in process, with a failure injected in each phase after the last step: the weights and the run record
are there, and one line says what failed and how to redo only that part.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from accelerate import Accelerator
from test_cli_errors import jsonl
from training_runs import (
    LABELS,
    REPO,
    TINY,
    command_env,
    final_weights,
    free_port,
    max_abs_diff,
    run,
    tmwpl_rows,
    write_jsonl,
)
from warm_commands import run_warm

import ncal_core.analyze as analyze
import ncal_core.evaluation.features as features
import ncal_core.evaluation.plots as plots
import ncal_core.evaluation.scoring as scoring
import ncal_core.infer as infer
import ncal_core.train.loop as loop
from ncal_core.errors import run_cli

ROWS = tmwpl_rows(9, seed=3, prefix="p")
LABEL_FLAG = ",".join(LABELS)
CSV_HEADER = "text,label\n"


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass(frozen=True)
class Fault:
    """One command run against the trained run: its flags and files, and the fragment its one error line holds (None:
    it succeeds, and `writes` names a file it must have written)."""

    id: str
    command: str  # infer, analyze, export, serve or train
    args: list[str]
    expect: str | None
    files: dict[str, str | None] = field(default_factory=dict)  # None: an empty folder
    copies: dict[str, str] = field(default_factory=dict)  # a folder of the case <- a model folder of the fixture
    writes: str | None = None

    def argv(self, tmp: Path, models: Path, port: int) -> list[str]:
        return [a.format(tmp=tmp, models=models, port=port, free=free_port()) for a in self.args]


def infer_args(*args: str) -> list[str]:
    return ["--model_path", "{models}/run", *args]


def analyze_args(*args: str) -> list[str]:
    return ["--model_path", "{models}/run", "--prompts_file", "{tmp}/p.jsonl", *args]


P = {"p.jsonl": jsonl(*ROWS)}
DATA_SET = {"ds/dataset_dict.json": '{"splits": ["train"]}', "ds/train/state.json": "mine"}  # a save_to_disk folder
TRAIN_ARGS = ["--dataset_path", "{tmp}/t.jsonl", "--overwrite_output_dir", "true", "--max_steps", "1", "--val_size",
              "0", "--per_device_train_batch_size", "2", "--save_strategy", "no"]
FAULTS = [
    # infer: where it writes
    Fault("infer_output_in_a_new_folder", "infer", infer_args("--prompts_file", "{tmp}/p.jsonl", "--output_file",
                                                              "{tmp}/new/deeper/preds.jsonl"), None, P,
          writes="new/deeper/preds.jsonl"),
    Fault("infer_output_under_a_file", "infer", infer_args("--prompts_file", "{tmp}/p.jsonl", "--output_file",
                                                           "{tmp}/a_file/preds.jsonl"),
          "--output_file {tmp}/a_file/preds.jsonl: cannot write there", {**P, "a_file": "mine"}),
    Fault("infer_output_is_the_prompts_file", "infer", infer_args("--prompts_file", "{tmp}/p.jsonl", "--output_file",
                                                                  "{tmp}/p.jsonl"),
          "--output_file {tmp}/p.jsonl: is the --prompts_file file", P),
    Fault("infer_output_is_the_prompts_file_by_another_path", "infer",
          infer_args("--prompts_file", "{tmp}/p.jsonl", "--output_file", "{tmp}/sub/../p.jsonl"),
          "is the --prompts_file file", {**P, "sub": None}),
    Fault("infer_csv_output_is_the_csv_prompts_file", "infer",
          infer_args("--prompts_file", "{tmp}/p.csv", "--output_file", "{tmp}/p.csv"), "is the --prompts_file file",
          {"p.csv": CSV_HEADER + "".join(f"{r['question']},{r['class']}\n" for r in ROWS)}),
    Fault("infer_metrics_is_the_prompts_file", "infer", infer_args("--prompts_file", "{tmp}/p.jsonl", "--metrics_file",
                                                                   "{tmp}/p.jsonl"),
          "--metrics_file {tmp}/p.jsonl: is the --prompts_file file", P),
    Fault("infer_metrics_is_the_output_file", "infer",
          infer_args("--prompts_file", "{tmp}/p.jsonl", "--output_file", "{tmp}/o.json", "--metrics_file",
                     "{tmp}/o.json"),
          "--metrics_file {tmp}/o.json: is the --output_file file", P),
    Fault("infer_output_is_a_folder", "infer",
          infer_args("--prompts_file", "{tmp}/p.jsonl", "--output_file", "{tmp}/d"),
          "--output_file {tmp}/d: is a folder", {**P, "d": None}),
    Fault("infer_output_over_a_runs_record", "infer", infer_args("--prompts_file", "{tmp}/p.jsonl", "--output_file",
                                                                 "{models}/run/ncal_run.json"),
          "--output_file {models}/run/ncal_run.json: a file of a training run", P),
    Fault("infer_metrics_over_a_runs_log", "infer", infer_args("--prompts_file", "{tmp}/p.jsonl", "--metrics_file",
                                                               "{models}/run/metrics.jsonl"),
          "a file of a training run", P),
    Fault("infer_output_over_a_file_of_the_data_set_folder", "infer",
          infer_args("--prompts_file", "{tmp}/ds", "--output_file", "{tmp}/ds/train/state.json"),
          "--output_file {tmp}/ds/train/state.json: a file of the --prompts_file folder", DATA_SET),
    # infer: what it reads
    Fault("infer_duplicate_labels", "infer", ["--model_path", "{models}/plain", "--prompt", "三角形", "--labels",
                                              "a,b,a"], "--labels: names the class 'a' twice"),
    Fault("infer_empty_label", "infer", infer_args("--prompt", "三角形", "--labels", "a,,b"),
          "--labels: an empty name"),
    Fault("infer_one_label", "infer", infer_args("--prompt", "三角形", "--labels", "a"), "--labels: needs at least 2"),
    Fault("infer_truncated_weights", "infer", ["--model_path", "{models}/truncated", "--prompt", "三角形"],
          "{models}/truncated/model.safetensors: not a readable safetensors file"),
    Fault("infer_folder_that_is_no_model", "infer", ["--model_path", "{tmp}/notes", "--prompt", "三角形"],
          "neither a checkpoint (config.json) nor an adapter", {"notes/todo.txt": "mine"}),
    Fault("infer_empty_prompts_file", "infer", infer_args("--prompts_file", "{tmp}/e.jsonl"),
          "e.jsonl: the file is empty", {"e.jsonl": ""}),
    Fault("infer_header_only_csv", "infer", infer_args("--prompts_file", "{tmp}/h.csv"), "h.csv: the file has no rows",
          {"h.csv": CSV_HEADER}),
    Fault("infer_labels_outside_the_runs", "infer", infer_args("--prompts_file", "{tmp}/w.jsonl"),
          "w.jsonl:2: class '未知' is not one of the training labels", {"w.jsonl": jsonl(ROWS[0], {**ROWS[1],
                                                                                               "class": "未知"})}),
    Fault("infer_compact_json_array", "infer", infer_args("--prompts_file", "{tmp}/c.json", "--output_file",
                                                          "{tmp}/c.out.jsonl"), None,
          {"c.json": json.dumps([{k: v for k, v in r.items() if k != "id"} for r in ROWS], ensure_ascii=False)},
          writes="c.out.jsonl"),
    # analyze
    Fault("analyze_into_the_model_folder", "analyze",
          analyze_args("--output_dir", "{models}/run", "--overwrite_output_dir", "true"),
          "--output_dir {models}/run: is --model_path", P),
    Fault("analyze_into_another_run", "analyze", analyze_args("--output_dir", "{tmp}/other"),
          "--output_dir {tmp}/other: holds the records of a training run", P, {"other": "run"}),
    Fault("analyze_into_another_run_with_overwrite", "analyze", analyze_args("--output_dir", "{tmp}/other",
                                                                             "--overwrite_output_dir", "true"),
          None, P, {"other": "run"}, writes="other/eval.json"),
    Fault("analyze_output_is_a_file", "analyze", analyze_args("--output_dir", "{tmp}/a_file"),
          "--output_dir {tmp}/a_file: exists and is not a folder", {**P, "a_file": "mine"}),
    Fault("analyze_output_under_a_file", "analyze", analyze_args("--output_dir", "{tmp}/a_file/out"),
          "--output_dir {tmp}/a_file/out: cannot write there", {**P, "a_file": "mine"}),
    Fault("analyze_would_write_over_its_rows", "analyze",
          ["--model_path", "{models}/run", "--prompts_file", "{tmp}/eval.json", "--output_dir", "{tmp}"],
          "would write over the --prompts_file file", {"eval.json": json.dumps(ROWS, ensure_ascii=False)}),
    Fault("analyze_would_write_over_a_file_of_the_data_set_folder", "analyze",
          ["--model_path", "{models}/run", "--prompts_file", "{tmp}/ds", "--output_dir", "{tmp}/ds/train"],
          "would write over {tmp}/ds/train/eval.json of the --prompts_file folder",
          {**DATA_SET, "ds/train/eval.json": "mine"}),
    Fault("analyze_rows_of_one_class", "analyze", analyze_args("--output_dir", "{tmp}/out"), None,
          {"p.jsonl": jsonl(*[r for r in ROWS if r["class"] == LABELS[0]])}, writes="out/eval.json"),
    Fault("analyze_duplicate_labels", "analyze", analyze_args("--output_dir", "{tmp}/out", "--labels", "a,b,a"),
          "--labels: names the class 'a' twice", P),
    Fault("analyze_empty_prompts_file", "analyze", analyze_args("--output_dir", "{tmp}/out"),
          "p.jsonl: the file is empty",
          {"p.jsonl": "\n"}),
    Fault("analyze_header_only_csv", "analyze", ["--model_path", "{models}/run", "--prompts_file", "{tmp}/h.csv",
                                                 "--output_dir", "{tmp}/out"], "h.csv: the file has no rows",
          {"h.csv": CSV_HEADER}),
    Fault("analyze_truncated_weights", "analyze", ["--model_path", "{models}/truncated", "--prompts_file",
                                                   "{tmp}/p.jsonl", "--output_dir", "{tmp}/out"],
          "not a readable safetensors file", P),
    # export
    Fault("export_into_a_folder_with_files", "export", ["--model_path", "{models}/run", "--output_dir", "{tmp}/out"],
          "--output_dir {tmp}/out: exists and is not an empty folder", {"out/thesis.tex": "mine"}),
    Fault("export_into_the_model_folder", "export", ["--model_path", "{models}/run", "--output_dir", "{models}/run"],
          "exists and is not an empty folder"),
    Fault("export_under_a_file", "export", ["--model_path", "{models}/run", "--output_dir", "{tmp}/a_file/out"],
          "--output_dir {tmp}/a_file/out: cannot write there", {"a_file": "mine"}),
    Fault("export_truncated_weights", "export", ["--model_path", "{models}/truncated", "--output_dir", "{tmp}/out"],
          "not a readable safetensors file"),
    Fault("export_folder_that_is_no_model", "export", ["--model_path", "{tmp}/notes", "--output_dir", "{tmp}/out"],
          "neither a checkpoint (config.json) nor an adapter", {"notes/todo.txt": "mine"}),
    Fault("export_into_a_new_folder", "export", ["--model_path", "{models}/run", "--output_dir", "{tmp}/a/b"], None,
          writes="a/b/config.json"),
    # train: the base model is an input
    Fault("train_into_its_base_model", "train",
          [*TRAIN_ARGS, "--model_name_or_path", "{tmp}/base", "--output_dir", "{tmp}/base"],
          "--output_dir {tmp}/base: holds --model_name_or_path {tmp}/base", {"t.jsonl": jsonl(*tmwpl_rows(6))},
          {"base": "plain"}),
    Fault("train_over_the_checkpoint_it_starts_from", "train",
          [*TRAIN_ARGS, "--model_name_or_path", "{tmp}/out/checkpoint-2", "--output_dir", "{tmp}/out"],
          "--output_dir {tmp}/out: holds --model_name_or_path {tmp}/out/checkpoint-2",
          {"t.jsonl": jsonl(*tmwpl_rows(6))}, {"out": "run", "out/checkpoint-2": "plain"}),
    # serve
    Fault("serve_port_taken", "serve", ["--model_path", "{models}/run", "--port", "{port}"],
          "--port: cannot listen on 127.0.0.1:{port} (Address already in use)"),
    Fault("serve_unknown_host", "serve", ["--model_path", "{models}/run", "--host", "no-such-host.invalid"],
          "--host no-such-host.invalid: not an address of this machine"),
    Fault("serve_port_out_of_range", "serve", ["--model_path", "{models}/run", "--port", "70000"],
          "--port: must be <= 65535, not 70000"),
    Fault("serve_truncated_weights", "serve", ["--model_path", "{models}/truncated", "--port", "{free}"],
          "not a readable safetensors file"),
    Fault("serve_model_without_labels", "serve", ["--model_path", "{models}/plain", "--port", "{free}"],
          "records no label set"),
]


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    tmp: Path
    before: dict[str, str]  # the case's own files, as written
    port: int  # the port held taken while the cases ran


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A tiny trained run, a copy with its weights cut in half, and a plain checkpoint that records no labels."""
    root = tmp_path_factory.mktemp("models")
    train = write_jsonl(root / "data" / "train.jsonl", tmwpl_rows(12))
    result = run("ncal_core.train", [*TINY, "--dataset_path", train, "--eval_dataset_path", "none", "--output_dir",
                                     root / "run", "--max_steps", "2", "--per_device_train_batch_size", "4",
                                     "--save_strategy", "no"], command_env(root / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    weights = Path(shutil.copytree(root / "run", root / "truncated")) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    plain = Path(shutil.copytree(root / "run", root / "plain"))
    for name in ("ncal_run.json", "metrics.jsonl"):
        (plain / name).unlink()
    return root


@pytest.fixture(scope="module")
def outcomes(models, tmp_path_factory) -> dict[str, Outcome]:
    """Every case run once, warm, with one port held taken; the fixture's folders hashed before and after."""
    before = hashes(models)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    requests, tmps, written = [], {}, {}
    for case in FAULTS:
        tmp = tmps[case.id] = tmp_path_factory.mktemp(case.id)
        for name, content in case.files.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir() if content is None else path.write_text(content, encoding="utf-8")
        for name, source in case.copies.items():
            shutil.copytree(models / source, tmp / name)
        written[case.id] = hashes(tmp)
        requests.append({"id": case.id, "module": f"ncal_core.{case.command}", "argv": case.argv(tmp, models, port),
                         "env": command_env(tmp / "cache"), "cwd": str(REPO), "stdout": str(tmp / "stdout.txt"),
                         "stderr": str(tmp / "stderr.txt")})
    try:
        codes = run_warm(requests, command_env(None), REPO)
    finally:
        taken.close()
    models_after[:] = [before, hashes(models)]
    return {case.id: Outcome(codes[case.id], (tmps[case.id] / "stdout.txt").read_text(encoding="utf-8"),
                             (tmps[case.id] / "stderr.txt").read_text(encoding="utf-8"), tmps[case.id],
                             written[case.id], port) for case in FAULTS}


models_after: list[dict[str, str]] = []  # hashes of the fixture's model folders before and after the cases ran


def test_no_case_changed_the_trained_run_or_a_model_folder(outcomes):
    before, after = models_after
    assert after == before


def test_the_corpus_is_large_and_its_ids_unique():
    assert len(FAULTS) >= 30 and len({c.id for c in FAULTS}) == len(FAULTS)
    assert {c.command for c in FAULTS} == {"infer", "analyze", "export", "serve", "train"}


@pytest.mark.parametrize("case", FAULTS, ids=[c.id for c in FAULTS])
def test_a_fault_is_one_line_and_loses_nothing(case, outcomes, models):
    out = outcomes[case.id]
    assert "Traceback" not in out.stderr, out.stderr
    if case.expect is None:
        assert out.returncode == 0, out.stderr[-3000:]
        assert (out.tmp / case.writes).is_file()
    else:
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2, out.stderr
        assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
        assert case.expect.format(tmp=out.tmp, models=models, port=out.port) in lines[0]
    after = hashes(out.tmp)
    # every file the case started with holds its bytes (a copied run's weights among them)
    assert {name: after.get(name) for name in out.before} == out.before



def test_infer_writes_its_own_output_file_in_a_run_folder_again(models, tmp_path):
    """The second infer with one --output_file inside the run's folder was refused as writing over the run's files;
    only the run's own files are kept from outputs."""
    run_dir = Path(shutil.copytree(models / "run", tmp_path / "run"))
    record = hashes(run_dir)
    preds = run_dir / "predictions.jsonl"
    argv = ["--model_path", str(run_dir), "--prompts_file", str(write_jsonl(tmp_path / "p.jsonl", ROWS)),
            "--output_file", str(preds)]
    assert infer.main(argv) == 0
    first = preds.read_bytes()
    assert infer.main(argv) == 0
    assert preds.read_bytes() == first and len(first.splitlines()) == len(ROWS)
    assert {name: digest for name, digest in hashes(run_dir).items() if name != preds.name} == record


# ---------------------------------------------------------------- progress bars

def test_progress_bars_count_to_what_they_announce(models, tmp_path, monkeypatch, capsys):
    """A batch split in several forward passes to bound its tokens once counted each pass as a batch: infer announced
    22 batches and counted 44. The bars count rows, which are known before the work starts."""
    monkeypatch.setattr(scoring, "EVAL_TOKENS", 48)  # every batch of 8 is split
    monkeypatch.setattr(features, "EVAL_TOKENS", 48)
    prompts = write_jsonl(tmp_path / "p.jsonl", tmwpl_rows(18, seed=4, prefix="q"))
    assert infer.main(["--model_path", str(models / "run"), "--prompts_file", str(prompts), "--batch_size", "8"]) == 0
    assert analyze.main(["--model_path", str(models / "run"), "--prompts_file", str(prompts), "--batch_size", "8",
                         "--output_dir", str(tmp_path / "analysis")]) == 0
    bars = re.findall(r"(\d+)/(\d+) \[", capsys.readouterr().err)
    assert ("18", "18") in bars and ("36", "36") in bars  # analyze reads each row twice: scores, then features
    assert all(int(done) <= int(total) for done, total in bars)


# ---------------------------------------------------------------- the end of training

def _train_argv(tmp: Path, eval_rows: list[dict]) -> list[str]:
    """A few steps of the tiny model with a development split and a test file, no checkpoints."""
    train = write_jsonl(tmp / "data" / "train.jsonl", tmwpl_rows(24))
    test = write_jsonl(tmp / "data" / "test.jsonl", eval_rows)
    return [*TINY[:-2], "--val_size", "6", "--dataset_path", str(train), "--eval_dataset_path", str(test),
            "--output_dir", str(tmp / "out"), "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--save_strategy", "no"]


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as stop:
        run_cli(loop.main, argv)
    return stop.value.code


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory):
    """The weights of the run every injected failure repeats, run to the end without one."""
    tmp = tmp_path_factory.mktemp("reference")
    assert _exit_code(_train_argv(tmp, tmwpl_rows(9, seed=1, prefix="t"))) == 0
    return final_weights(tmp / "out")


def _fail_scoring(split: str, after: int = 0):
    """loop.run_eval failing on `split` from its (after + 1)-th scoring on."""
    real = loop.run_eval
    done = []

    def failing(run, log, rows, this_split, tag, tau):
        if this_split == split:
            done.append(tag)
            if len(done) > after:
                raise RuntimeError(f"injected into the {split} scoring")
        return real(run, log, rows, this_split, tag, tau)

    return failing


def _raise(err: Exception):
    def failing(*args, **kwargs):
        raise err

    return failing


PHASES = {
    "dev_scoring": ("scoring the development split", lambda m: m.setattr(loop, "run_eval", _fail_scoring("dev"))),
    "test_scoring": ("scoring the test rows of", lambda m: m.setattr(loop, "run_eval", _fail_scoring("test"))),
    "report": ("writing the report", lambda m: m.setattr(loop, "write_report", _raise(OSError(28, "No space left")))),
    "picture": ("writing the report", lambda m: m.setattr(plots, "f1_bars", _raise(ValueError("no font")))),
    "trackers": ("ending the trackers", lambda m: m.setattr(Accelerator, "end_training",
                                                             _raise(ConnectionError("tracker offline")))),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_failure_after_training_keeps_the_weights_and_says_how_to_redo_that_part(phase, tmp_path, monkeypatch,
                                                                                   capsys, reference_weights):
    what, inject = PHASES[phase]
    argv = _train_argv(tmp_path, tmwpl_rows(9, seed=1, prefix="t"))
    inputs = hashes(tmp_path / "data")
    inject(monkeypatch)
    assert _exit_code(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s]" not in line
             and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"error: {what}"), lines
    out = tmp_path / "out"
    assert "failed after training" in lines[0] and f"the trained weights and run record are saved in {out}" in lines[0]
    assert "python -m ncal_core.analyze --model_path" in lines[0]
    assert max_abs_diff(final_weights(out), reference_weights) == 0.0
    assert (out / "ncal_run.json").is_file() and hashes(tmp_path / "data") == inputs
    # the line is for the user; the traceback, which a bug's report needs, is kept beside the weights
    assert f"its traceback is in {out / loop.ERROR_FILE}" in lines[0]
    kept = (out / loop.ERROR_FILE).read_text(encoding="utf-8")
    assert kept.startswith("Traceback (most recent call last):") and ", in failing\n" in kept  # where it was raised


def test_a_test_file_of_one_class_is_scored_and_the_figures_it_cannot_make_are_named(tmp_path, capsys,
                                                                                    reference_weights):
    """The issue's case: the first rows of a test file, all of one class, once lost the trained weights."""
    argv = _train_argv(tmp_path, [r for r in tmwpl_rows(9, seed=1, prefix="t") if r["class"] == LABELS[0]])
    assert _exit_code(argv) == 0
    out = tmp_path / "out"
    report = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert report["per_class"][LABELS[0]]["support"] == 3 and 0.0 <= report["accuracy"] <= 1.0
    assert "neural_collapse" not in report and "2 classes" in report["skipped"]["neural_collapse"]
    assert not (out / "sphere.png").exists() and (out / "per_class_f1.png").is_file()
    assert "skipped neural_collapse: needs rows of at least 2 classes" in capsys.readouterr().out
    assert max_abs_diff(final_weights(out), reference_weights) == 0.0


def test_the_weights_saved_before_a_failed_final_scoring_carry_no_tau_chosen_for_other_weights(tmp_path, monkeypatch,
                                                                                              capsys):
    """The development split scored at step 1 chose a tau for those weights; the final weights were saved with it,
    and infer would have applied it when the final scoring then failed."""
    argv = [*_train_argv(tmp_path, tmwpl_rows(9, seed=1, prefix="t")), "--eval_strategy", "steps", "--eval_steps", "1"]
    monkeypatch.setattr(loop, "run_eval", _fail_scoring("dev", after=1))
    assert _exit_code(argv) == 2
    assert "scoring the development split failed after training" in capsys.readouterr().err
    out = tmp_path / "out"
    chosen = [line["logit_adjust_tau"] for line in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if line.get("split") == "dev"]
    assert len(chosen) == 1 and chosen[0] is not None  # step 1's choice, for step 1's weights
    assert json.loads((out / "ncal_run.json").read_text())["logit_adjust_tau"] is None
