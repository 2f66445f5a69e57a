"""Does TC help? SFT against NCAL variants and long-tail baselines on TMWPL with the built-in tiny model.

Every run trains with `python -m ncal_core.train` on TMWPL train minus a class-balanced development
split (`--dev_per_class` rows per class, the same split for every run), then scores the development
split and TMWPL test once. Settings that need tuning (the post-hoc logit-adjustment tau) are chosen
on the development split only; test numbers are reported for what the development split chose.
Each method's macro-F1 is compared with SFT's scored the same way (`x+LA` with `sft+LA`, `x` with `sft`,
`sft+LA` with `sft`): the mean difference over seeds and its paired-bootstrap 95% interval over test rows.
A method with TC is also compared with its SFT twin, the method that trains exactly alike with TC off
(`sft_twin`): that difference is TC's own share. The seeds of a method are also scored as one ensemble
(the mean of their label log-probabilities, as `python -m ncal_core.infer --model_path A,B,C` scores
them), and a TC method's ensemble is compared with its twin's.

    python -m bench.reproduce                       # every method (several hours on 2 cores)
    python -m bench.reproduce --methods sft,ncal --seeds 0,1,2
    python -m bench.reproduce --quick               # a CI-sized run: asserts nothing about who wins
    python -m bench.reproduce --model ~/.cache/ncal-real/qwen2.5-coder-0.5b-instruct --out bench/results/reproduce_real

With --model (a pretrained checkpoint folder) every run trains LoRA adapters (r 8, alpha 32, q/k/v/o, lr 2e-4:
the paper's settings) on a fixed long-tailed fraction of the training set (--train_fraction, every class cut
alike, so the imbalance stays), and the table gains `zero_shot`: the checkpoint as it is, prompted with an
instruction that names and defines the seven TMWPL classes (ZERO_SHOT_INSTRUCTION), scored on the same rows.

Runs are resumable: a finished run's scores are kept in OUT/runs/<method>-s<seed>/scores.json. A finished run
is reused only while the settings it recorded (ncal_run.json) are those its method's flags give now; one
trained under other settings (say, before a default changed) is trained again.
Writes OUT/results.json and OUT/results.md after every finished run (the table so far), and OUT/comparison.png.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ncal_core.cli import parse_config
from ncal_core.data.prompts import PromptBuilder
from ncal_core.data.registry import resolve_dataset
from ncal_core.data.rows import load_examples
from ncal_core.durable import read_json, write_json
from ncal_core.evaluation.metrics import classification_report, paired_bootstrap
from ncal_core.evaluation.predictor import class_scores, load_predictor
from ncal_core.evaluation.scoring import ensemble_log_probs
from ncal_core.evaluation.tau_choice import TAU_GRID, choose_tau, dev_row_weights
from ncal_core.loss.logit_adjustment import adjust_scores, log_prior
from ncal_core.run_record import RunRecord
from ncal_core.train.config import TrainConfig, uses_lora, uses_tc
from ncal_core.train.setup import read_data

# every run starts from these, so that a method means the same whatever ncal_core.train's defaults become
PINNED = ["--use_etf_loss", "true", "--la_loss_tau", "0", "--resample", "none"]
# method name -> flags of ncal_core.train on top of the pinned and common ones (a later flag wins)
PAIRS = ["--tc_variant", "pairs", "--class_diff", "true"]
METHODS: dict[str, list[str]] = {
    "sft": ["--use_etf_loss", "false"],
    "ncal": ["--lambda_lc", "0.1", "--pooling", "last", *PAIRS],
    "ncal_l1": ["--lambda_lc", "1.0", "--pooling", "last", *PAIRS],
    "ncal_seq_last": ["--lambda_lc", "0.1", "--pooling", "seq_last", *PAIRS],
    "ncal_mean": ["--lambda_lc", "0.1", "--pooling", "mean", *PAIRS],
    "ncal_seq_last_l1": ["--lambda_lc", "1.0", "--pooling", "seq_last", *PAIRS],
    "ncal_mean_l1": ["--lambda_lc", "1.0", "--pooling", "mean", *PAIRS],
    "ncal_allpairs": ["--lambda_lc", "0.1", "--pooling", "last", "--tc_variant", "pairs", "--class_diff", "false"],
    "ncal_allpairs_l1": ["--lambda_lc", "1.0", "--pooling", "last", "--tc_variant", "pairs", "--class_diff", "false"],
    "etf_target": ["--lambda_lc", "1.0", "--pooling", "last", "--tc_variant", "etf_target"],
    "sft_la_loss": ["--use_etf_loss", "false", "--la_loss_tau", "1.0"],
    "ncal_la_loss": ["--lambda_lc", "0.1", "--pooling", "last", *PAIRS, "--la_loss_tau", "1.0"],
    "ncal_seq_last_la_loss": ["--lambda_lc", "0.1", "--pooling", "seq_last", *PAIRS, "--la_loss_tau", "1.0"],
    "sft_drw": ["--use_etf_loss", "false", "--resample", "balanced", "--resample_epochs", "1"],
    "sft_sqrt": ["--use_etf_loss", "false", "--resample", "sqrt"],
    "ncal_sqrt": ["--lambda_lc", "0.1", "--pooling", "last", *PAIRS, "--resample", "sqrt"],
    "ncal_mean_l1_sqrt": ["--lambda_lc", "1.0", "--pooling", "mean", *PAIRS, "--resample", "sqrt"],
    "ncal_mean_l3_sqrt": ["--lambda_lc", "3.0", "--pooling", "mean", *PAIRS, "--resample", "sqrt"],
    "ncal_mean_allpairs_l1_sqrt": ["--lambda_lc", "1.0", "--pooling", "mean", "--tc_variant", "pairs",
                                   "--class_diff", "false", "--resample", "sqrt"],
    "ncal_mean_l1_sqrt_lr5e-4": ["--lambda_lc", "1.0", "--pooling", "mean", *PAIRS, "--resample", "sqrt",
                                 "--learning_rate", "5e-4"],
    "sft_sqrt_e5": ["--use_etf_loss", "false", "--resample", "sqrt", "--num_train_epochs", "5"],
    "ncal_mean_l1_sqrt_e5": ["--lambda_lc", "1.0", "--pooling", "mean", *PAIRS, "--resample", "sqrt",
                             "--num_train_epochs", "5"],
    "ncal_mean_l1_sqrt_la_loss": ["--lambda_lc", "1.0", "--pooling", "mean", *PAIRS, "--resample", "sqrt",
                                  "--la_loss_tau", "1.0"],
    "sft_sqrt_la_loss": ["--use_etf_loss", "false", "--resample", "sqrt", "--la_loss_tau", "1.0"],
    "ncal_mean_l1_sqrt_lr2e-3": ["--lambda_lc", "1.0", "--pooling", "mean", *PAIRS, "--resample", "sqrt",
                                 "--learning_rate", "2e-3"],
    "ncal_mean_l1_sqrt_e2": ["--lambda_lc", "1.0", "--pooling", "mean", *PAIRS, "--resample", "sqrt",
                             "--num_train_epochs", "2"],
    "sft_untied": ["--use_etf_loss", "false", "--tiny_tied_embeddings", "false"],
    "sft_sqrt_untied": ["--use_etf_loss", "false", "--resample", "sqrt", "--tiny_tied_embeddings", "false"],
    "ncal_mean_l1_sqrt_untied": ["--lambda_lc", "1.0", "--pooling", "mean", *PAIRS, "--resample", "sqrt",
                                 "--tiny_tied_embeddings", "false"],
    "ncal_drw": ["--lambda_lc", "0.1", "--pooling", "last", *PAIRS, "--resample", "balanced",
                 "--resample_epochs", "1"],
    "etf_target_la_loss": ["--lambda_lc", "1.0", "--pooling", "last", "--tc_variant", "etf_target",
                           "--la_loss_tau", "1.0"],
    # classification heads (docs/heads.md) instead of label scoring; TC on the head's input, whatever --pooling
    "head_linear": ["--use_etf_loss", "false", "--head", "linear"],
    "head_linear_tc": ["--lambda_lc", "1.0", *PAIRS, "--head", "linear"],
    "head_linear_la_loss": ["--use_etf_loss", "false", "--head", "linear", "--la_loss_tau", "1.0"],
    "head_etf": ["--use_etf_loss", "false", "--head", "etf"],
    "head_etf_tc": ["--lambda_lc", "1.0", *PAIRS, "--head", "etf"],
    "head_etf_la_loss": ["--use_etf_loss", "false", "--head", "etf", "--la_loss_tau", "1.0"],
}
# the real-model table (--model): the paper's TC placement (ncal), the project's default TC (ncal_mean_l1_sqrt), the
# etf_target variant, and the SFT twin of each (sft, sft_sqrt); zero_shot trains nothing
ZERO_SHOT = "zero_shot"
MODEL_METHODS = [ZERO_SHOT, "sft", "sft_sqrt", "ncal", "ncal_mean_l1_sqrt", "etf_target"]
PAPER_LORA = ["--use_lora", "true", "--lora_r", "8", "--lora_alpha", "32", "--target_modules",
              "q_proj,k_proj,v_proj,o_proj", "--learning_rate", "2e-4"]
# the protocol that fits two CPU cores at 0.5B (docs/real_model.md): a quarter of TMWPL train, ten rows a class
# held out for development, two epochs of 8-row steps (~500 optimizer steps; 32-row steps would give ~125)
MODEL_PROTOCOL = {"train_fraction": 0.25, "dev_per_class": 10, "epochs": 2.0}
MODEL_BATCH = ["--per_device_train_batch_size", "8"]
# the training precision of --model runs (scoring is fp32 either way): bf16 trains twice as fast on these CPUs, and
# its SFT run matched fp32's on the development split (docs/real_model.md)
PRECISIONS = {"bf16": ["--bf16", "true", "--torch_dtype", "bfloat16"], "fp32": []}
ZERO_SHOT_INSTRUCTION = (
    "你是小学数学题的认知领域分类器。根据TIMSS认知领域，判断这道题主要考查学生的哪一种能力，只回答下列七个类别名称之一：\n"
    "回忆（Recall）：回忆定义、术语、数的性质、单位、计算法则等已学知识。\n"
    "识别（Identify）：识别数学对象、图形、数量或表达式，判断它们是否等价或属于某一类。\n"
    "选取策略（Formulate）：为解决问题选择合适的运算、方法或策略。\n"
    "表征建模（Represent/model）：用算式、方程、图形、表格或图示表示或建模题中的信息。\n"
    "过程实施（Implement）：按照给定步骤或算法完成计算或操作。\n"
    "推断（Infer）：从已知条件或规律出发进行推理，得出结论或推广。\n"
    "分析（Analyze）：分析、比较或判断数量关系、条件与结论之间的联系，综合多步信息解决问题。"
)
TAIL = 3  # report per-class F1 of the three smallest training classes
# settings that do not change the weights a run of this script ends with (where files go, speed paths,
# evaluation-time options; with --save_strategy no there is no earlier checkpoint to load back)
NOT_TRAINING = {"output_dir", "overwrite_output_dir", "eval_dataset_path", "eval_strategy", "save_strategy",
                "save_steps", "save_total_limit", "load_best_model_at_end", "logging_steps", "resume_from_checkpoint",
                "logit_adjust_tau", "per_device_eval_batch_size", "padding_free", "tc_backend", "torch_compile"}


# settings of a part of training that is off: they change nothing (TC with its weight at 0, LoRA in full fine-tuning)
TC_SETTINGS = {"lambda_lc", "e_w", "class_diff", "pooling", "tc_variant"}
LORA_SETTINGS = {"lora_r", "lora_alpha", "lora_dropout", "target_modules"}


def unused_settings(config: dict) -> set[str]:
    """The settings that do not change what a run with this config trains."""
    unused = set()
    if not uses_tc(config["use_etf_loss"], config["lambda_lc"]):
        unused |= TC_SETTINGS
    if not uses_lora(config["use_lora"], config["model_name_or_path"]):
        unused |= LORA_SETTINGS
    if config["resample"] == "none":
        unused.add("resample_epochs")
    return unused


def stale_settings(recorded: dict, flags: list[str]) -> dict[str, tuple]:
    """{setting: (recorded, wanted)} where a finished run's recorded config differs from what `flags` give now,
    leaving out settings that neither the recorded run nor the wanted one uses (an SFT run's TC pooling, say)."""
    wanted = vars(parse_config(TrainConfig, flags, "", "python -m ncal_core.train"))
    ignored = NOT_TRAINING | (unused_settings(recorded) & unused_settings(wanted))
    return {k: (recorded[k], v) for k, v in wanted.items() if k in recorded and k not in ignored and recorded[k] != v}


def sft_twin(method: str) -> str | None:
    """The method without TC that trains exactly as `method` does with TC off (its share of a result is TC's);
    None for a method without TC or without such a twin."""
    flags = [*PINNED, *METHODS[method]]
    config = vars(parse_config(TrainConfig, flags, "", ""))
    if not uses_tc(config["use_etf_loss"], config["lambda_lc"]):
        return None
    tc_off = vars(parse_config(TrainConfig, [*flags, "--use_etf_loss", "false"], "", ""))
    return next((other for other in METHODS if other != method
                 and not stale_settings(tc_off, [*PINNED, *METHODS[other]])), None)


def _run(method: str, seed: int, out: Path, common: list[str]) -> Path:
    """Train one (method, seed) unless its run folder already holds a model trained with these settings."""
    run_dir = out / "runs" / f"{method}-s{seed}"
    flags = ["--output_dir", str(run_dir), "--seed", str(seed), "--overwrite_output_dir", "true",
             "--eval_dataset_path", "none", "--save_strategy", "no", "--load_best_model_at_end", "false", *PINNED,
             *common, *METHODS[method]]
    record = RunRecord.read(run_dir) if run_dir.is_dir() else None
    if record and record.labels and (run_dir / "tokenizer_config.json").is_file():  # a finished run
        stale = stale_settings(record.config, flags)
        if not stale:
            return run_dir
        print(f"{run_dir}: trained with other settings, training again: "
              + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in stale.items()), flush=True)
        (run_dir / "scores.json").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "ncal_core.train", *flags]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    (run_dir / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return run_dir


def _score_splits(predictor, builder: PromptBuilder, label_counts: list[int], dev_rows, test_rows, cache: Path,
                  **settings) -> dict:
    """Summed label log-probs of the dev and test rows, written to `cache` with `settings` (what they depend on)."""
    result = {"labels": builder.labels, "label_counts": label_counts, **settings}
    for name, rows in (("dev", dev_rows), ("test", test_rows)):
        scores = class_scores(predictor, builder.prompt_ids_all(rows), builder.label_ids, 32).cpu()
        result[name] = {"scores": scores.tolist(), "gold": [builder.labels.index(r.label) for r in rows]}
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json(cache, result)
    return result


def _scores(run_dir: Path, dev_rows, test_rows) -> dict:
    """Summed label log-probs of a trained run's dev and test rows, cached in run_dir/scores.json."""
    cache = run_dir / "scores.json"
    if cache.is_file():
        return read_json(cache, "scores cache")
    predictor = load_predictor(run_dir)
    builder = PromptBuilder(predictor.tokenizer, predictor.labels, cutoff_len=predictor.cutoff_len)
    return _score_splits(predictor, builder, RunRecord.read(run_dir).label_counts, dev_rows, test_rows, cache)


def _zero_shot_scores(model: str, common: list[str], test_rows, out: Path) -> dict:
    """The untrained checkpoint's label log-probs with ZERO_SHOT_INSTRUCTION, on the dev split and label prior the
    training runs get from the same flags; cached in OUT/runs/zero_shot/scores.json while those stay the same."""
    data = read_data(parse_config(TrainConfig, [*PINNED, *common], "", "python -m ncal_core.train"))
    settings = {"checkpoint": model, "instruction": ZERO_SHOT_INSTRUCTION, "dev_ids": [r.id for r in data.dev_rows],
                "test_ids": [r.id for r in test_rows]}
    cache = out / "runs" / ZERO_SHOT / "scores.json"
    if cache.is_file():
        cached = read_json(cache, "scores cache")
        if all(cached.get(k) == v for k, v in settings.items()):
            return cached
    predictor = load_predictor(model)
    builder = predictor.prompt_builder(data.labels, ZERO_SHOT_INSTRUCTION)
    return _score_splits(predictor, builder, data.counts, data.dev_rows, test_rows, cache, **settings)


def train_subset(train_path: Path, fraction: float, out: Path) -> Path:
    """OUT/train_f<fraction>.jsonl: round(fraction * n_c) rows of every class c of a .jsonl training file, drawn
    with a fixed seed and kept in file order, so the subset has the full set's imbalance."""
    if train_path.suffix != ".jsonl":
        raise SystemExit(f"--train_fraction: needs a .jsonl training file, not {train_path}")
    by_class: dict[str, list[int]] = {}
    for example in load_examples(train_path):
        by_class.setdefault(example.label, []).append(int(example.where.rsplit(":", 1)[1]))
    rng = random.Random(0)
    kept = {line for label in sorted(by_class)
            for line in rng.sample(by_class[label], max(1, round(fraction * len(by_class[label]))))}
    lines = train_path.read_text(encoding="utf-8").splitlines(keepends=True)
    path = out / f"train_f{fraction:g}.jsonl"
    path.write_text("".join(lines[n - 1] for n in sorted(kept)), encoding="utf-8")
    return path


def _predict(split: dict, prior: torch.Tensor, tau: float) -> list[int]:
    return adjust_scores(torch.tensor(split["scores"]), prior, tau).argmax(1).tolist()


def _bootstrap_delta(gold: list[int], preds_a: list[list[int]], preds_b: list[list[int]], labels: list[str]
                     ) -> tuple[float, float, float]:
    """Mean over seeds of macro-F1(b) - macro-F1(a), and its 95% interval resampling test rows jointly."""
    out = paired_bootstrap(gold, preds_a, preds_b, len(labels), n_boot=1000)
    return out["delta"], out["low"], out["high"]


def _choose_tau(dev: dict, prior: torch.Tensor, adjusted: bool, labels: list[str]) -> tuple[float, float]:
    """(tau, dev macro-F1): chosen on the development split as ncal_core.train chooses it, or 0 without adjustment."""
    weights = dev_row_weights(dev["gold"], len(labels), "balanced")
    tau, by_tau = choose_tau(torch.tensor(dev["scores"]), dev["gold"], prior, weights,
                             TAU_GRID if adjusted else [0.0])
    return tau, max(by_tau)


def _ensemble(by_seed: list[dict], prior: torch.Tensor, adjusted: bool, labels: list[str]) -> dict:
    """The seeds' models as one (as `ncal_core.infer --model_path A,B,C` scores them), tau chosen on dev the
    same way; {} for a single seed."""
    if len(by_seed) < 2:
        return {}
    split = {name: {"scores": ensemble_log_probs([torch.tensor(res[name]["scores"]) for res in by_seed]).tolist(),
                    "gold": by_seed[0][name]["gold"]} for name in ("dev", "test")}
    tau, dev_f1 = _choose_tau(split["dev"], prior, adjusted, labels)
    predictions = _predict(split["test"], prior, tau)
    return {"tau": tau, "dev_macro_f1": dev_f1, "test_predictions": predictions,
            "macro_f1": classification_report(split["test"]["gold"], predictions, labels)["macro_f1"]}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: dict[str, dict[int, dict]], out: Path) -> list[dict]:
    """Per method (plain argmax and post-hoc logit adjustment with tau chosen on dev): means, stds, intervals."""
    rows = []
    first = next(iter(next(iter(results.values())).values()))
    labels, counts = first["labels"], first["label_counts"]
    prior = log_prior(counts)
    tail = sorted(range(len(labels)), key=lambda c: counts[c])[:TAIL]
    gold = first["test"]["gold"]
    preds: dict[str, list[list[int]]] = {}
    for method, by_seed in results.items():
        for adjusted in (False, True):
            name = f"{method}+LA" if adjusted else method
            taus, dev = [], []
            for seed, res in sorted(by_seed.items()):
                tau, dev_f1 = _choose_tau(res["dev"], prior, adjusted, labels)
                taus.append(tau)
                dev.append(dev_f1)
            preds[name] = [_predict(res["test"], prior, t) for (_, res), t in zip(sorted(by_seed.items()), taus)]
            ensemble = _ensemble(list(by_seed.values()), prior, adjusted, labels)
            if ensemble:
                preds[f"{name} ensemble"] = [ensemble.pop("test_predictions")]
            reports = [classification_report(gold, p, labels) for p in preds[name]]
            acc = _mean_std([r["accuracy"] for r in reports])
            f1 = _mean_std([r["macro_f1"] for r in reports])
            row = {"method": name, "seeds": sorted(by_seed), "taus": taus, "dev_macro_f1_mean": statistics.mean(dev),
                   "accuracy_mean": acc[0], "accuracy_std": acc[1], "macro_f1_mean": f1[0], "macro_f1_std": f1[1],
                   "macro_f1_per_seed": [r["macro_f1"] for r in reports],
                   "train_seconds": [res.get("train_seconds") for _, res in sorted(by_seed.items())],
                   "tail_f1": {labels[c]: _mean_std([r["per_class"][labels[c]]["f1"] for r in reports])[0]
                               for c in tail},
                   "ensemble": ensemble}
            rows.append(row)
    seeds = {row["method"]: row["seeds"] for row in rows}
    twins = {method: sft_twin(method) if method in METHODS else None for method in results}
    for row in rows:
        name = row["method"]
        base = _baseline(name)
        if name != "sft" and seeds.get(base) == row["seeds"]:
            row["delta_vs_sft"] = _bootstrap_delta(gold, preds[base], preds[name], labels)
        method, adjusted = name.removesuffix("+LA"), name.endswith("+LA")
        twin = twins[method]
        twin_name = f"{twin}+LA" if twin and adjusted else twin
        if twin_name and seeds.get(twin_name) == row["seeds"]:
            row["twin"] = twin_name
            row["delta_vs_twin"] = _bootstrap_delta(gold, preds[twin_name], preds[name], labels)
            if row["ensemble"]:
                row["ensemble"]["delta_vs_twin"] = _bootstrap_delta(gold, preds[f"{twin_name} ensemble"],
                                                                    preds[f"{name} ensemble"], labels)
    return rows


def _baseline(method: str) -> str:
    """The row a method is compared with: SFT scored the same way (with or without logit adjustment);
    SFT + LA with plain SFT."""
    return "sft+LA" if method.endswith("+LA") and method != "sft+LA" else "sft"


def delta_cell(delta: tuple[float, float, float] | None) -> str:
    """A difference and its 95% interval, `+0.012 [-0.010, +0.034]`; – where there is none."""
    return f"{delta[0]:+.3f} [{delta[1]:+.3f}, {delta[2]:+.3f}]" if delta else "–"


def results_table(rows: list[dict]) -> str:
    """The markdown table of `summarise`'s rows (read back from results.json too); docs/results.md shows it."""
    tail_names = list(rows[0]["tail_f1"])
    head = ("| method | seeds | dev macro-F1 | accuracy | macro-F1 | Δ macro-F1 vs SFT scored alike [95% CI] | "
            "Δ vs its SFT twin: TC's share [95% CI] | " + " | ".join(f"F1 {n}" for n in tail_names)
            + " | seed ensemble macro-F1 | its Δ vs the SFT twin's ensemble [95% CI] |")
    lines = [head, "|" + "---|" * (9 + len(tail_names))]
    for row in rows:
        ensemble = row.get("ensemble") or {}
        cells = [row["method"], str(len(row["seeds"])), f"{row['dev_macro_f1_mean']:.3f}",
                 f"{row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f}",
                 f"{row['macro_f1_mean']:.3f} ± {row['macro_f1_std']:.3f}",
                 delta_cell(row.get("delta_vs_sft")), delta_cell(row.get("delta_vs_twin")),
                 *(f"{row['tail_f1'][n]:.3f}" for n in tail_names),
                 f"{ensemble['macro_f1']:.3f}" if ensemble else "–", delta_cell(ensemble.get("delta_vs_twin"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def headline_table(rows: list[dict]) -> str:
    """The short table of `summarise`'s rows the README shows: each method's test macro-F1 with post-hoc adjustment
    (the development split's choice of tau), and TC's share over its SFT twin."""
    lines = ["| method | seeds | dev macro-F1 | test macro-F1 | Δ vs `sft+LA` [95% CI] | TC's share: Δ vs its SFT twin "
             "[95% CI] |", "|---|---|---|---|---|---|"]
    for row in rows:
        if not row["method"].endswith("+LA"):
            continue
        vs_sft = row.get("delta_vs_sft") if row["method"] != "sft+LA" else None  # sft+LA's own is against plain sft
        lines.append(f"| `{row['method']}` | {len(row['seeds'])} | {row['dev_macro_f1_mean']:.3f} | "
                     f"{row['macro_f1_mean']:.3f} ± {row['macro_f1_std']:.3f} | {delta_cell(vs_sft)} | "
                     f"{delta_cell(row.get('delta_vs_twin'))} |")
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], path: Path) -> None:
    path.write_text(results_table(rows), encoding="utf-8")


def write_results(results: dict[str, dict[int, dict]], out: Path, plot: bool = False) -> None:
    """OUT/results.json and OUT/results.md of the runs finished so far (and OUT/comparison.png with `plot`)."""
    rows = summarise(results, out)
    write_json(out / "results.json", rows)
    write_table(rows, out / "results.md")
    if plot:
        from ncal_core.evaluation.plots import comparison_plot

        comparison_plot(rows, out / "comparison.png")

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", help="comma-separated, from: " + ", ".join(METHODS) + f", {ZERO_SHOT} (with "
                        "--model); default: all of them, with --model " + ",".join(MODEL_METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="bench/results/reproduce")
    parser.add_argument("--dev_per_class", type=int, help="development rows held out per class (default: 20, with "
                        f"--model {MODEL_PROTOCOL['dev_per_class']})")
    parser.add_argument("--train", default="tmwpl", help="the training set: a name or a file (bench/resplit.py "
                        "writes a second one)")
    parser.add_argument("--test", default="tmwpl", help="the test set: a name (its test split) or a file")
    parser.add_argument("--quick", action="store_true", help="2 methods, 1 seed, 30 steps of a smaller model")
    parser.add_argument("--model", help="a pretrained checkpoint folder: LoRA runs with the paper's settings, and "
                        f"zero_shot; methods default to {','.join(MODEL_METHODS)}")
    parser.add_argument("--train_fraction", type=float, help="train on this fraction of every class of the training "
                        f"set (default: 1, with --model {MODEL_PROTOCOL['train_fraction']})")
    parser.add_argument("--epochs", type=float, help=f"epochs of every run (default: ncal_core.train's, with --model "
                        f"{MODEL_PROTOCOL['epochs']:g})")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="bf16", help="with --model: train LoRA "
                        "over a bf16 base under bf16 autocast, or in fp32 (default: bf16)")
    parser.add_argument("--table", type=Path, metavar="DIR", help="only print the short table (rows with post-hoc "
                        "adjustment) of the results.json in DIR, as the README shows it")
    parser.add_argument("extra", nargs="*", help="more flags for every training run, after --")
    args = parser.parse_args(argv)
    if args.table is not None:
        if not (args.table / "results.json").is_file():
            parser.error(f"--table {args.table}: no results.json there")
        print(headline_table(json.loads((args.table / "results.json").read_text(encoding="utf-8"))), end="")
        return 0
    protocol = MODEL_PROTOCOL if args.model else {"train_fraction": 1.0, "dev_per_class": 20, "epochs": None}
    for name, value in protocol.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    methods = ["sft", "ncal"] if args.quick else (args.methods or ",".join(MODEL_METHODS if args.model else METHODS)
                                                  ).split(",")
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    for method in methods:
        if method not in METHODS and not (method == ZERO_SHOT and args.model):
            parser.error(f"unknown method {method!r}" + (" (zero_shot needs --model)" if method == ZERO_SHOT else ""))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_path, test_path = resolve_dataset(args.train, "train"), resolve_dataset(args.test, "test")
    dataset = args.train
    if args.train_fraction != 1:
        train_path = train_subset(train_path, args.train_fraction, out)
        dataset = str(train_path)
    # the flag as given: a run records it, and a cached run is reused while its recorded flags are unchanged
    common = ["--dataset_path", dataset, "--dev_per_class", str(args.dev_per_class)]
    if args.model:
        common += ["--model_name_or_path", args.model, *PAPER_LORA, *MODEL_BATCH, *PRECISIONS[args.precision]]
    if args.epochs is not None:
        common += ["--num_train_epochs", f"{args.epochs:g}"]
    common += args.extra
    if args.quick:
        common += ["--max_steps", "30", "--tiny_hidden_size", "64", "--tiny_num_layers", "1"]
    test_rows, train_rows = load_examples(test_path), load_examples(train_path)
    results: dict[str, dict[int, dict]] = {}
    if ZERO_SHOT in methods:  # one scoring, the same for every seed (so it pairs with each seed of the others)
        zero_shot = _zero_shot_scores(args.model, common, test_rows, out)
        results[ZERO_SHOT] = {seed: zero_shot for seed in seeds}
        print(f"{ZERO_SHOT}: done", flush=True)
    for method in (m for m in methods if m != ZERO_SHOT):
        for seed in seeds:
            run_dir = _run(method, seed, out, common)
            dev_ids = set(json.loads((run_dir / "dev_ids.json").read_text()))
            dev_rows = [r for r in train_rows if r.id in dev_ids]
            seconds = run_dir / "train_seconds.txt"
            results.setdefault(method, {})[seed] = {**_scores(run_dir, dev_rows, test_rows), "train_seconds":
                                                    float(seconds.read_text()) if seconds.is_file() else None}
            write_results(results, out)  # the table so far: a long sitting that stops keeps what it finished
            print(f"{method} seed {seed}: done", flush=True)
    write_results(results, out, plot=True)
    print((out / "results.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
