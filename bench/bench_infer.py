"""Prediction throughput of our constrained label scoring against transformers' generate, side by side.

    python -m bench.bench_infer [--quick] [--model tiny|Qwen2.5-0.5B] [--model_path DIR] [--rows N]
        [--single_rows N] [--batch_size B] [--threads N] [--json PATH] [--workdir DIR]
        [--reference_code DIR [--reference_python PY]] [--head] [--no_generate]

Three ways to predict the label of each TMWPL test question, with the same model on the CPU in fp32:
- ours: `python -m ncal_core.infer` (constrained label scoring: every label's tokens scored in one forward
  pass per batch of --batch_size prompts, the label with the highest log-probability wins; the run's post-hoc
  tau applied, as infer applies it);
- generate, batched: transformers' greedy `generate` (bench/generate_baseline.py), --batch_size prompts a
  batch padded on the left, at most the longest label's tokens + 1 (eos) new tokens; the decoded text, stripped,
  is the prediction if it is exactly a label, else it is "no label" (and wrong);
- generate, one prompt at a time: the same with batch 1, as the reference's inference.py runs (greedy here,
  not its sampling, so that the run is deterministic; that script is not part of this project).
- with --reference_code DIR, a fourth: the paper's own inference.py from DIR under --reference_python
  (bench/paper_code.py), one prompt at a time with its sampling and fp16 weights as it ships, its new tokens
  capped as the generate sides' are; it reads the questions as text (its chat template, no instruction). It
  clocks nothing itself, so it runs on the first fifth of the one-at-a-time rows (once to warm up,
  discarded), on all of them and on the fifth again; its prompts/s is the extra prompts over the extra wall
  time (its `predict_s` is the time that rate gives).
- with --head, a classification head: the same decoder with a K-way `score` layer on the last prompt token
  (--head linear, docs/heads.md), its weights random, saved as a Qwen2ForSequenceClassification folder and run
  by `python -m ncal_core.infer`: one forward a prompt, no label tokens; against ours, which scores every
  label's tokens after each prompt. Only its speed means something (macro-F1 is chance). --no_generate leaves
  the generate sides out.
Both generate sides read the prompt ids ncal_core's PromptBuilder gives with the model's run settings, which
are the ids infer scores after; ours encodes its prompts inside its timed loop (tens of ms for 350
rows), the others read ids.

Each side is its own subprocess under bench_train's launcher (wall time, CPU time, peak RSS of that process).
prompts/s = rows / the seconds of the prediction loop alone, as the side itself clocks it (infer's
`predict_seconds`, the baseline's `predict_s`): loading the model is not counted. macro-F1 is
ncal_core.evaluation.metrics' over the TMWPL labels, an output that is no label counting as wrong.

Models: `tiny` (default) is the built-in tiny model trained here for one epoch (`python -m ncal_core.train
--num_train_epochs 1`, a few minutes), or the trained run folder given by --model_path (a full checkpoint,
such as the default training run's outputs/ncal-tiny-tmwpl); `Qwen2.5-0.5B` is a random model of that architecture with
Qwen's real tokenizer (bench_train's builder): untrained, so its macro-F1 is chance and its generated text
mostly no label; there only the speed means something. --rows N scores N of the 350 test rows, spread evenly
over the file (which is sorted by class, so its first N rows would be one class); the one-prompt-at-a-time
side scores --single_rows rows spread the same way (default: 50 with Qwen2.5-0.5B, whose generate takes about
a second a prompt on 2 threads; otherwise as many as the others).

--quick trains a very small tiny model (20 steps, hidden 64, one layer: seconds) and runs all three sides on
30 rows on one thread: a smoke test of the whole path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import memory_model
from bench.bench_train import REPO, build_checkpoint, print_table, run_and_write, run_measured, write_tokenizer
from bench.paper_code import (
    code_script,
    differenced_runs,
    inference_command,
    read_responses,
    write_prompts,
    write_slow_tokenizer_files,
)
from ncal_core.data.prompts import PromptBuilder
from ncal_core.data.registry import resolve_dataset
from ncal_core.data.rows import Example, label_set, load_examples
from ncal_core.evaluation.metrics import classification_report
from ncal_core.model.tokenizer import load_tokenizer
from ncal_core.run_record import RunRecord

MODELS = ("tiny", "Qwen2.5-0.5B")
TRAIN_FULL = ["--num_train_epochs", "1"]
# the built-in model small and a few steps long: seconds on one thread (it learns little more than the head class)
TRAIN_QUICK = ["--max_steps", "20", "--tiny_hidden_size", "64", "--tiny_num_layers", "1", "--val_size", "0",
               "--eval_dataset_path", "none", "--eval_strategy", "no", "--save_strategy", "no"]
QUICK_ROWS = 30
QWEN_SINGLE_ROWS = 50
HOW = {"ours": "constrained label scoring (python -m ncal_core.infer)",
       "generate_batched": "transformers generate, batched, left padding",
       "generate_single": "one prompt at a time, as the reference's inference.py runs (greedy here, not its sampling)",
       "paper_inference": "the paper's own inference.py: one prompt at a time, sampling, fp16 (rate differenced)",
       "head": "a random linear classification head on the same decoder (python -m ncal_core.infer)"}
RANDOM_NOTE = ("random weights (untrained): macro-F1 is chance and generated text is mostly no label; "
               "the point here is speed")


# ---------------------------------------------------------------- set-up: the model and the rows

def spaced(count: int, n: int) -> list[int]:
    """n indices spread evenly over range(count), in order."""
    return [i * count // n for i in range(n)]


def prepare_model(args: argparse.Namespace, workdir: Path, threads: int) -> tuple[Path, dict[str, float] | None]:
    """The model folder every side reads, and the training run's measurements when it was trained here."""
    if args.model_path is not None:
        if not (args.model_path / "config.json").is_file():
            raise SystemExit(f"--model_path {args.model_path}: needs a full checkpoint (config.json), as a tiny "
                             "model's run leaves; transformers' generate cannot read an adapter alone")
        return args.model_path, None
    folder = workdir / "model"
    if args.model == "tiny":
        flags = TRAIN_QUICK if args.quick else TRAIN_FULL
        cmd = [sys.executable, "-m", "ncal_core.train", "--output_dir", str(folder), "--overwrite_output_dir",
               "true", *flags]
        return folder, run_measured(cmd, workdir / "train", threads, args.timeout)
    write_tokenizer(folder, "qwen", [])
    build_checkpoint(folder, memory_model.QWEN25[args.model])
    return folder, None


def infer_prompt_builder(folder: Path, labels: list[str]) -> PromptBuilder:
    """The PromptBuilder infer scores with for this model: its run's instruction, cutoff and truncation, if any."""
    run = RunRecord.read(folder)
    settings = {name: run.config[name] for name in ("instruction", "cutoff_len", "truncation")
                if run is not None and name in run.config}
    return PromptBuilder(load_tokenizer(folder), labels, **settings)


@dataclass
class Case:
    """What every side predicts: the rows, their gold labels and the files each side reads."""

    folder: Path
    labels: list[str]
    gold: list[str]
    prompts_file: Path  # the rows as TMWPL JSON lines, for infer
    ids_file: Path  # their PromptBuilder prompt ids, for generate
    max_new_tokens: int  # the longest label's tokens + eos


def prepare_case(folder: Path, test_path: Path, rows: int, workdir: Path, name: str) -> Case:
    """`rows` test rows spread over the file, written as JSON lines and as prompt ids."""
    lines = [line for line in test_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    examples = load_examples(test_path)
    labels = label_set(examples, test_path)
    keep = spaced(len(examples), rows)
    chosen: list[Example] = [examples[i] for i in keep]
    builder = infer_prompt_builder(folder, labels)
    prompts_file, ids_file = workdir / f"rows-{name}.jsonl", workdir / f"ids-{name}.jsonl"
    prompts_file.write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")
    ids_file.write_text("".join(json.dumps({"id": e.id, "input_ids": ids}) + "\n"
                                for e, ids in zip(chosen, builder.prompt_ids_all(chosen))), encoding="utf-8")
    return Case(folder, labels, [e.label for e in chosen], prompts_file, ids_file,
                max(map(len, builder.label_ids)))


def head_folder(folder: Path, labels: list[str], workdir: Path) -> Path:
    """The model's decoder with a random linear head over `labels`, as a sequence-classification folder."""
    from ncal_core.model.classifier import attach_head, save_classifier
    from ncal_core.model.qwen import load_model

    out = workdir / "head-model"
    tokenizer = load_tokenizer(folder)
    save_classifier(attach_head(load_model(folder), len(labels), "linear", seed=0), out, labels,
                    tokenizer.pad_token_id)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------- the sides

def side_result(side: str, case: Case, predictions: list[str], predict_s: float,
                proc: dict[str, float]) -> dict[str, Any]:
    """One side's row: rows, prompts/s of its prediction loop, its process's measurements, macro-F1, no-label count."""
    pred_index = [case.labels.index(p) if p in case.labels else -1 for p in predictions]
    report = classification_report([case.labels.index(g) for g in case.gold], pred_index, case.labels)
    return {"side": side, "how": HOW[side], "rows": len(predictions), "predict_s": predict_s,
            "prompts_per_s": len(predictions) / predict_s, **proc, "macro_f1": report["macro_f1"],
            "accuracy": report["accuracy"], "no_label": pred_index.count(-1)}


def run_ours(case: Case, batch: int, workdir: Path, threads: int, timeout: float, side: str = "ours",
             folder: Path | None = None) -> dict[str, Any]:
    """`python -m ncal_core.infer` over the case's rows (with the model in `folder`, default the case's): its
    predictions file and its report's predict_seconds."""
    out, metrics = workdir / f"{side}-predictions.jsonl", workdir / f"{side}-metrics.json"
    cmd = [sys.executable, "-m", "ncal_core.infer", "--model_path", str(folder or case.folder), "--prompts_file",
           str(case.prompts_file), "--output_file", str(out), "--metrics_file", str(metrics), "--labels",
           ",".join(case.labels), "--batch_size", str(batch), "--device", "cpu"]
    proc = run_measured(cmd, workdir / side, threads, timeout)
    predictions = [json.loads(line)["prediction"] for line in out.read_text(encoding="utf-8").splitlines()]
    seconds = json.loads(metrics.read_text(encoding="utf-8"))["predict_seconds"]
    return side_result(side, case, predictions, seconds, proc)


def run_generate(side: str, case: Case, batch: int, workdir: Path, threads: int, timeout: float) -> dict[str, Any]:
    """bench/generate_baseline.py over the case's prompt ids; its texts mapped to labels by exact match."""
    out = workdir / f"{side}.json"
    cmd = [sys.executable, "-m", "bench.generate_baseline", "--model", str(case.folder),
           "--prompts", str(case.ids_file), "--batch", str(batch), "--max_new_tokens", str(case.max_new_tokens),
           "--out", str(out)]
    proc = run_measured(cmd, workdir / side, threads, timeout)
    log = json.loads(out.read_text(encoding="utf-8"))
    return side_result(side, case, log["texts"], log["predict_s"], proc)


def run_paper_inference(case: Case, workdir: Path, threads: int, timeout: float, code: Path,
                        python: str) -> dict[str, Any]:
    """The paper's inference.py on the first fifth of the case's rows and on all of them (paper_code's
    differenced_runs); prompts/s differenced."""
    questions = [e.messages[-1]["content"] for e in load_examples(case.prompts_file)]
    short, everything = max(1, len(questions) // 5), len(questions)
    write_slow_tokenizer_files(case.folder)

    def run(n: int) -> dict[str, float]:
        prompts = workdir / f"paper-prompts-{n}.txt"
        write_prompts(questions[:n], prompts)
        cmd = inference_command(python, code, case.folder, prompts, workdir / f"paper-responses-{n}.json",
                                case.max_new_tokens)
        return run_measured(cmd, workdir / f"paper-inference-{n}", threads, timeout)

    rate, measured_short, measured_long = differenced_runs(run, short, everything)
    responses = read_responses(workdir / f"paper-responses-{everything}.json", everything)
    return {**side_result("paper_inference", case, responses, everything / rate, measured_long),
            "code": f"{code / 'inference.py'} under {python}", "wall_s_short": measured_short["wall_s"],
            "rows_short": short}


def compare(ours: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Ratios ours / one baseline (ours: a side of ours, label scoring or a head)."""
    return {"side": ours["side"], "baseline": base["side"], "rows_ours": ours["rows"], "rows_baseline": base["rows"],
            "prompts_per_s_ratio": ours["prompts_per_s"] / base["prompts_per_s"],
            "peak_rss_ratio": ours["peak_rss_mb"] / base["peak_rss_mb"],
            "macro_f1_ours": ours["macro_f1"], "macro_f1_baseline": base["macro_f1"]}


# ---------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with --rows, --single_rows and --threads resolved."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a very small tiny model, 30 rows, one thread")
    parser.add_argument("--model", choices=MODELS, default="tiny",
                        help="tiny: trained here for one epoch (default); Qwen2.5-0.5B: random weights, real tokenizer")
    parser.add_argument("--model_path", type=Path, help="a trained run folder (full checkpoint) instead of training "
                                                        "one, e.g. outputs/ncal-tiny-tmwpl")
    parser.add_argument("--rows", type=int, help="test rows, spread over the file (default all 350; 30 with --quick)")
    parser.add_argument("--single_rows", type=int, help="rows of the one-prompt-at-a-time side (default: 50 with "
                                                        "Qwen2.5-0.5B, else --rows)")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per batch of ours and batched generate "
                                                                   "(infer's default)")
    parser.add_argument("--threads", type=int, help="torch threads of every side (default 2, quick 1)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "bench_infer.json")
    parser.add_argument("--workdir", type=Path, help="keep the model, rows and logs here (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    parser.add_argument("--reference_code", type=Path, help="the paper's code/ folder: its inference.py runs as a "
                                                            "fourth side (bench/paper_code.py)")
    parser.add_argument("--head", action="store_true", help="a random linear classification head on the same decoder "
                                                            "as another side, against label scoring")
    parser.add_argument("--no_generate", action="store_true", help="leave out both transformers generate sides")
    parser.add_argument("--reference_python", default=sys.executable,
                        help="the interpreter that runs --reference_code, with its stack (default: this one)")
    args = parser.parse_args(argv)
    if args.reference_code is not None:
        code_script(args.reference_code, "inference.py")
    if args.quick and (args.model != "tiny" or args.model_path is not None):
        parser.error("--quick trains its own very small tiny model")
    if args.model_path is not None and args.model != "tiny":
        parser.error("--model_path replaces the tiny model trained here; Qwen2.5-0.5B is built here")
    args.rows = args.rows or (QUICK_ROWS if args.quick else None)
    default_single = QWEN_SINGLE_ROWS if args.model == "Qwen2.5-0.5B" else None
    args.single_rows = args.single_rows or default_single
    args.threads = args.threads or (1 if args.quick else min(2, os.cpu_count() or 1))
    if args.reference_code is not None and min(filter(None, (args.single_rows, args.rows)), default=2) < 2:
        parser.error("--reference_code: its rate is differenced between a fifth of the one-at-a-time rows and all "
                     "of them, so --single_rows and --rows must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    """Prepare the model and rows, run the three sides, print the tables and write JSON."""
    args = parse_args(argv)
    run_and_write(args.json, args.workdir, lambda workdir: run_all(args, workdir))
    return 0


def run_all(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Everything the report holds."""
    test_path = resolve_dataset("tmwpl", "test")
    total = len(load_examples(test_path))
    rows = min(args.rows or total, total)
    single_rows = min(args.single_rows or rows, rows)
    folder, training = prepare_model(args, workdir, args.threads)
    case = prepare_case(folder, test_path, rows, workdir, "all")
    single = case if single_rows == rows else prepare_case(folder, test_path, single_rows, workdir, "single")
    model = str(args.model_path) if args.model_path else args.model
    print(f"model {model}; {rows} of {total} test rows ({single_rows} one prompt at a time), batch {args.batch_size}, "
          f"threads {args.threads}, at most {case.max_new_tokens} new tokens; load average {os.getloadavg()[0]:.2f}",
          flush=True)

    sides = [run_ours(case, args.batch_size, workdir, args.threads, args.timeout)]
    if args.head:  # right after label scoring's side, on the same rows, so that the two see the same machine
        sides.append(run_ours(case, args.batch_size, workdir, args.threads, args.timeout, side="head",
                              folder=head_folder(folder, case.labels, workdir)))
    if not args.no_generate:
        sides += [run_generate("generate_batched", case, args.batch_size, workdir, args.threads, args.timeout),
                  run_generate("generate_single", single, 1, workdir, args.threads, args.timeout)]
    if args.reference_code is not None:
        sides.append(run_paper_inference(single, workdir, args.threads, args.timeout, args.reference_code,
                                         args.reference_python))
    comparisons = [compare(sides[1], sides[0])] if args.head else []  # the head against label scoring
    comparisons += [compare(sides[0], base) for base in sides[1:] if base["side"] != "head"]
    note = RANDOM_NOTE if args.model == "Qwen2.5-0.5B" else "trained"
    print_table(f"Prediction on the CPU, fp32, model {model}: {note}", sides,
                ["side", "rows", "prompts_per_s", "predict_s", "wall_s", "peak_rss_mb", "macro_f1", "no_label", "how"])
    print_table("Ours / baseline", comparisons,
                ["side", "baseline", "rows_ours", "rows_baseline", "prompts_per_s_ratio", "peak_rss_ratio",
                 "macro_f1_ours", "macro_f1_baseline"])
    print("\nprompts/s counts the prediction loop alone (model loading left out); wall_s is the whole process.")
    return {"mode": "quick" if args.quick else "full", "model": model, "note": note, "training": training,
            "rows": rows, "single_rows": single_rows, "batch_size": args.batch_size,
            "max_new_tokens": case.max_new_tokens, "labels": case.labels,
            "machine": {"threads": args.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                        "loadavg": os.getloadavg()[0]},
            "sides": sides, "comparisons": comparisons}


if __name__ == "__main__":
    sys.exit(main())
