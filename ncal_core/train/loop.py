"""`python -m ncal_core.train`: LoRA (or full) fine-tuning with the label-only LM loss and the TC loss.

The loop reads top to bottom: config -> data -> model -> optimizer -> steps -> checkpoints -> report.
`accelerate launch -m ncal_core.train ...` runs it data-parallel; every rank builds the same list
of global batches from the seed and takes its own slice, so the TC loss and the token count of
each step are those of the global batch.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object
from tqdm.auto import tqdm

from ncal_core.cli import DTYPES, parse_config
from ncal_core.data.batching import MEGABATCH_BATCHES, LengthGroupedBatches
from ncal_core.data.prompts import PromptBuilder
from ncal_core.data.registry import resolve_dataset
from ncal_core.data.rows import check_labels, dev_split, label_set, load_examples
from ncal_core.errors import NCALError
from ncal_core.evaluation.evaluate import evaluate, write_report
from ncal_core.loss.longtail import class_counts, first_label_tokens, log_prior, row_weights, simplex_etf
from ncal_core.loss.objective import TrainingObjective, compile_layers
from ncal_core.loss.tc import resolve_backend
from ncal_core.model.lora import inject_lora, load_adapter, save_adapter
from ncal_core.model.qwen import load_model, save_model
from ncal_core.model.tiny import tiny_checkpoint
from ncal_core.model.tokenizer import load_tokenizer
from ncal_core.run_record import RUN_FILE
from ncal_core.train.checkpoint import (
    prune_checkpoints,
    read_optimizer_state,
    read_rng,
    read_state,
    resolve_checkpoint,
    save_checkpoint,
)
from ncal_core.train.config import BUILTIN_TINY, TrainConfig, uses_lora, uses_tc
from ncal_core.train.resume import check_resume, rank_rng, resume_settings, rng_state, set_rng_state
from ncal_core.train.run_folder import prepare_output_dir, save_run_output, truncate_log
from ncal_core.train.schedule import make_optimizer, make_scheduler, set_peak_lr
from ncal_core.train.step import StepParts, StepRecord, host_values, train_step
from ncal_core.train.summary import outputs_summary, plan_summary

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _eval_path(cfg: TrainConfig) -> Path | None:
    """The evaluation file: the flag, or the test split of a named dataset, or none."""
    if cfg.eval_dataset_path is not None:
        return None if cfg.eval_dataset_path.lower() == "none" else resolve_dataset(cfg.eval_dataset_path, "test")
    if Path(cfg.dataset_path).exists():
        return None
    return resolve_dataset(cfg.dataset_path, "test")


def _learning_rate(cfg: TrainConfig) -> float:
    """--learning_rate, or its default for the kind of training."""
    return cfg.learning_rate or (2e-4 if uses_lora(cfg.use_lora, cfg.model_name_or_path) else 1e-3)


def _meant_a_real_model(cfg: TrainConfig) -> bool:
    """Flags that make sense for a pretrained checkpoint, given without --model_name_or_path."""
    return bool(cfg.use_lora or cfg.bf16 or cfg.fp16 or "tmwpl" not in cfg.dataset_path.lower())


def _base_model(cfg: TrainConfig, texts: list[str]) -> Path:
    """The base checkpoint folder: the user's, or the built-in tiny one (built on first use)."""
    if cfg.model_name_or_path == BUILTIN_TINY:
        return tiny_checkpoint(texts, seed=cfg.seed, vocab_size=cfg.tiny_vocab_size,
                               hidden_size=cfg.tiny_hidden_size, num_layers=cfg.tiny_num_layers,
                               tied=cfg.tiny_tied_embeddings)
    path = Path(cfg.model_name_or_path)
    if not path.is_dir():
        raise NCALError(f"--model_name_or_path {cfg.model_name_or_path}: not a checkpoint folder "
                        "(download the model first, e.g. `huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct "
                        "--local-dir DIR`)")
    return path


def _read_resume(cfg: TrainConfig, resume: Path, world: int, lr: float,
                 main_proc: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A checkpoint's trainer state and RNG states, refused in one line when this run cannot continue it."""
    state = read_state(resume)
    # a Hugging Face Trainer checkpoint (the reference code's) has a trainer_state.json of another shape
    for key, kind in (("step", int), ("epoch", int), ("micro_batch", int), ("scheduler", dict)):
        if not isinstance(state.get(key), kind):
            raise NCALError(f"{resume / 'trainer_state.json'}: not a checkpoint of ncal_core.train "
                            f"(no {kind.__name__} {key!r})")
    rng = read_rng(resume)
    for line in check_resume(cfg, world, lr, state, rng, resume):
        if main_proc:
            print(line, flush=True)
    return state, rng


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's accelerate state: mixed precision, and the process group's timeout (--ddp_timeout)."""
    # launched as several processes (accelerate launch --multi_gpu, torchrun) on a machine without CUDA:
    # without cpu=True accelerate starts every process as a lone rank 0, all writing the same folder
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision="bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no", cpu=multi_cpu,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout))])


def main(argv: list[str] | None = None) -> int:
    """Parse flags and train."""
    cfg = parse_config(TrainConfig, argv, description=__doc__.splitlines()[0], prog="python -m ncal_core.train")
    train(cfg)
    return 0


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training job; returns the final evaluation report (empty without an eval set)."""
    cfg.check()
    if cfg.fp16 and not torch.cuda.is_available():
        raise NCALError("--fp16: float16 mixed precision needs a CUDA GPU; use --bf16 true on CPU")
    accelerator = make_accelerator(cfg)
    main_proc, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    output_dir = Path(cfg.output_dir)
    resume = resolve_checkpoint(cfg.resume_from_checkpoint, output_dir) if cfg.resume_from_checkpoint else None
    if resume:  # checked before anything is loaded: a resume that cannot continue the run is refused at once
        saved_state, rng = _read_resume(cfg, resume, world, _learning_rate(cfg), main_proc)
    if main_proc:
        prepare_output_dir(output_dir, cfg, resuming=resume is not None)
    accelerator.wait_for_everyone()

    # data
    train_path = resolve_dataset(cfg.dataset_path, "train")
    train_rows = load_examples(train_path)
    labels = cfg.label_types or label_set(train_rows, train_path)
    check_labels(train_rows, labels, train_path)
    if cfg.dev_per_class:
        train_rows, dev_rows = dev_split(train_rows, cfg.dev_per_class, cfg.dev_seed, train_path)
    counts = class_counts([labels.index(r.label) for r in train_rows], len(labels))
    eval_path = _eval_path(cfg)
    eval_rows = load_examples(eval_path) if eval_path else []
    if eval_path:
        check_labels(eval_rows, labels, eval_path)

    # model
    use_lora = uses_lora(cfg.use_lora, cfg.model_name_or_path)
    lr = _learning_rate(cfg)
    # the label names go into the tiny tokenizer's corpus too, so each becomes a token or two
    if main_proc and cfg.model_name_or_path == BUILTIN_TINY and _meant_a_real_model(cfg):
        print("note: training the built-in tiny model from scratch (no --model_name_or_path given); pass "
              "--model_name_or_path DIR to fine-tune a Qwen checkpoint", flush=True)
    with accelerator.main_process_first():  # the tiny model is built once, by the main process
        # absolute, so that adapters and the run record name it from any folder
        base = _base_model(cfg, [m["content"] for row in train_rows for m in row.messages]
                           + [row.label for row in train_rows]).resolve()
    tokenizer = load_tokenizer(base)
    builder = PromptBuilder(tokenizer, labels, instruction=cfg.instruction, cutoff_len=cfg.cutoff_len,
                            truncation=cfg.truncation)
    encoded = builder.encode_all(train_rows)
    torch.manual_seed(cfg.seed)
    model = load_model(resume if resume and not use_lora else base, dtype=DTYPES[cfg.torch_dtype],
                       device=accelerator.device)
    if use_lora:
        if resume:
            load_adapter(model, resume)
        else:
            inject_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.torch_compile:
        compile_layers(model)
    use_tc = uses_tc(cfg.use_etf_loss, cfg.lambda_lc)
    first_tokens = torch.tensor(first_label_tokens(builder.label_ids, labels), device=accelerator.device) \
        if cfg.la_loss_tau > 0 else None
    tc_backend = resolve_backend(cfg.tc_backend, accelerator.device)
    objective = TrainingObjective(model, use_tc=use_tc, pooling=cfg.pooling, e_w=cfg.e_w, tc_backend=tc_backend,
                                  padding_free=cfg.padding_free, first_tokens=first_tokens)
    etf_targets = simplex_etf(len(labels), model.config.hidden_size, cfg.seed).to(accelerator.device) \
        if use_tc and cfg.tc_variant == "etf_target" else None
    prior_log = log_prior(counts).to(accelerator.device)
    optimizer = make_optimizer(model, lr, cfg.weight_decay)

    # the plan: every rank sees the same global batches and takes its slice of each
    global_batch = cfg.per_device_train_batch_size * world
    sampler = LengthGroupedBatches([len(r.input_ids) for r in encoded], global_batch, seed=cfg.seed,
                                   drop_last=len(encoded) >= global_batch,
                                   weights=row_weights([r.label_index for r in encoded], len(labels), cfg.resample),
                                   weighted_from_epoch=max(0, math.ceil(cfg.num_train_epochs) - cfg.resample_epochs)
                                   if cfg.resample_epochs else 0,
                                   megabatch_batches=MEGABATCH_BATCHES if cfg.group_by_length else 1)
    steps_per_epoch = len(sampler) // cfg.gradient_accumulation_steps
    if steps_per_epoch == 0 or (world > 1 and len(encoded) < global_batch):  # each rank needs rows of its own
        raise NCALError(f"{train_path}: {len(encoded)} rows are fewer than one optimizer step needs "
                        f"({global_batch} x {cfg.gradient_accumulation_steps})")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    scheduler = make_scheduler(optimizer, cfg.lr_scheduler_type, math.ceil(cfg.warmup_ratio * total_steps),
                               total_steps)
    objective, optimizer = accelerator.prepare(objective, optimizer)

    state: dict[str, Any] = {"step": 0, "epoch": 0, "micro_batch": 0, "best_macro_f1": None, "best_checkpoint": None,
                             "log_lines": 0}
    if resume:
        state = saved_state
        try:
            optimizer.load_state_dict(read_optimizer_state(resume))
        except ValueError as err:
            raise NCALError(f"{resume / 'optimizer.pt'}: does not fit the model being trained ({err})") from None
        scheduler.load_state_dict(state["scheduler"])
        set_peak_lr(scheduler, lr)  # a changed --learning_rate is honoured
        if accelerator.scaler is not None and "scaler" in state:
            accelerator.scaler.load_state_dict(state["scaler"])
        set_rng_state(rank_rng(rng, rank, world))
        if main_proc and resume.parent.resolve() == output_dir.resolve() and "log_lines" in state:
            # what the interrupted run logged after this checkpoint is logged again by this run
            truncate_log(output_dir / "metrics.jsonl", state["log_lines"])
    else:
        torch.manual_seed(cfg.seed + rank)
    state["run"] = resume_settings(cfg, world, lr)
    run_info = {"labels": labels, "label_counts": counts, "base_model": str(base), "use_lora": use_lora,
                "learning_rate": lr, "config": asdict(cfg)}

    def save_weights(folder: Path) -> None:
        inner = accelerator.unwrap_model(objective).model
        if use_lora:
            save_adapter(inner, folder, base_model_name_or_path=str(base), r=cfg.lora_r, alpha=cfg.lora_alpha,
                         dropout=cfg.lora_dropout, target_modules=cfg.target_modules)
        else:
            save_model(inner, folder)
        tokenizer.save_pretrained(folder)
        (folder / RUN_FILE).write_text(json.dumps(run_info, indent=2, ensure_ascii=False), encoding="utf-8")

    def checkpoint() -> Path | None:
        if accelerator.scaler is not None:  # a resumed fp16 run continues at the loss scale it had reached
            state["scaler"] = accelerator.scaler.state_dict()
        rng = rng_state()
        if world > 1:  # each rank draws dropout from its own stream (seed + rank): the main process saves all
            for r, theirs in enumerate(gather_object([rng])):
                rng.update({f"{name}.rank{r}": value for name, value in theirs.items()})
        if not main_proc:
            return None
        folder = save_checkpoint(output_dir, state["step"], save_weights=save_weights, optimizer=optimizer,
                                 rng=rng, state=state)
        best = Path(state["best_checkpoint"]) if state["best_checkpoint"] else None
        prune_checkpoints(output_dir, cfg.save_total_limit, protect=best)
        return folder

    def log(record: dict[str, Any]) -> None:
        state["log_lines"] = state.get("log_lines", 0) + 1
        if main_proc:
            with open(output_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    eval_gold = [labels.index(row.label) for row in eval_rows]

    def run_eval(tag: str) -> tuple[dict[str, Any], torch.Tensor]:
        report, features = evaluate(accelerator.unwrap_model(objective).model, builder, eval_rows,
                                    pooling=cfg.pooling, e_w=cfg.e_w, batch_size=cfg.per_device_eval_batch_size,
                                    prior_log=prior_log, tau=cfg.logit_adjust_tau, rank=rank, world=world)
        log({"step": state["step"], "epoch": state["epoch"], "eval": tag,
             "eval_accuracy": report["accuracy"], "eval_macro_f1": report["macro_f1"]})
        return report, features

    if main_proc:
        print(plan_summary(train_path=train_path, labels=labels, counts=counts,
                           dev_rows=len(dev_rows) if cfg.dev_per_class else 0, eval_path=eval_path,
                           eval_rows=len(eval_rows), model_name=cfg.model_name_or_path, model=model,
                           use_lora=use_lora, total_steps=total_steps, per_device=cfg.per_device_train_batch_size,
                           world=world, accumulation=cfg.gradient_accumulation_steps, output_dir=output_dir),
              flush=True)

    # the loop
    K = len(labels)
    accum = cfg.gradient_accumulation_steps
    objective.train()
    bar = tqdm(total=total_steps, initial=state["step"], disable=not main_proc, dynamic_ncols=True)
    parts = StepParts(accelerator, objective, optimizer, scheduler, encoded, tokenizer.pad_token_id, cfg, K,
                      prior_log, etf_targets, accelerator.device, tc_backend, world, rank)
    sums = StepRecord.zero(accelerator.device)  # since the last log line
    clock = time.perf_counter()

    # Ctrl-C (SIGINT) or a scheduler's SIGTERM asks the loop to stop after the current step, where weights,
    # optimizer, RNG and state agree, so the checkpoint saved there resumes exactly. Alone, a second signal
    # stops at once; under a launcher, which forwards the terminal's Ctrl-C to ranks that already got it,
    # repeats are ignored and the ranks agree at a log step to stop together (a launcher that sends SIGTERM
    # kills its ranks 30 s later: keep --logging_steps short enough to reach a log step by then).
    stop: list[int] = []

    def request_stop(signum: int, frame: Any) -> None:
        stop.append(signum)
        if world == 1:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def stop_requested(log_step: bool) -> bool:
        if world == 1:
            return bool(stop)
        if not log_step:
            return False
        return accelerator.reduce(torch.tensor([float(bool(stop))], device=accelerator.device), "sum").item() > 0

    def stop_here() -> None:
        bar.close()
        folder = checkpoint()
        if main_proc:
            print(f"interrupted: saved {folder}; continue with --resume_from_checkpoint latest", flush=True)
        raise SystemExit(128 + (stop[0] if stop else signal.SIGINT))  # the shell's code for death by that signal

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS} if in_main_thread else {}
    try:
        while state["step"] < total_steps:
            sampler.set_epoch(state["epoch"])
            batches = list(sampler)[: steps_per_epoch * accum]
            while state["micro_batch"] < len(batches) and state["step"] < total_steps:
                group = batches[state["micro_batch"]: state["micro_batch"] + accum]
                sums = train_step(parts, group, sums)
                state["step"] += 1
                state["micro_batch"] += accum
                state["scheduler"] = scheduler.state_dict()
                bar.update(1)
                log_step = state["step"] % cfg.logging_steps == 0 or state["step"] == total_steps
                if log_step:
                    lm_sum_all, tokens, tc_all, micro, rows_seen = host_values(
                        accelerator.reduce(sums.packed(), "sum"))
                    lm_mean, tc_mean = lm_sum_all / tokens, tc_all / (micro / world)
                    total = lm_mean + (cfg.lambda_lc * tc_mean if use_tc else 0.0)
                    record = {"step": state["step"],
                              "epoch": round(state["epoch"] + state["micro_batch"] / len(batches), 4),
                              "loss": total, "lm_loss": lm_mean, "tc_loss": tc_mean,
                              "lr": scheduler.get_last_lr()[0],
                              "samples_per_s": rows_seen / max(time.perf_counter() - clock, 1e-9)}
                    bar.set_postfix(loss=f"{total:.4f}", lm=f"{lm_mean:.4f}", tc=f"{tc_mean:.4f}",
                                    lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}")
                    log(record)
                    sums = StepRecord.zero(accelerator.device)
                    clock = time.perf_counter()
                    if not math.isfinite(total):
                        folder = checkpoint()
                        raise NCALError(f"step {state['step']}: the loss is {total}; stopped "
                                        f"(state saved in {folder})")
                if cfg.save_strategy == "steps" and state["step"] % cfg.save_steps == 0:
                    checkpoint()
                if stop_requested(log_step):
                    stop_here()
            if state["micro_batch"] >= len(batches):
                state["epoch"] += 1
                state["micro_batch"] = 0
                new_best = False
                if eval_rows and cfg.eval_strategy == "epoch" and state["step"] < total_steps:
                    report, _ = run_eval(f"epoch {state['epoch']}")
                    if state["best_macro_f1"] is None or report["macro_f1"] > state["best_macro_f1"]:
                        new_best = True
                        state["best_macro_f1"] = report["macro_f1"]
                        state["best_checkpoint"] = str(output_dir / f"checkpoint-{state['step']}")
                if cfg.save_strategy == "epoch" or (new_best and cfg.save_strategy != "no"):
                    checkpoint()
                if stop_requested(True):
                    stop_here()
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler installed outside Python
                signal.signal(sig, handler)
    bar.close()

    report: dict[str, Any] = {}
    if eval_rows:
        report, features = run_eval("final")
    if main_proc:
        save_run_output(output_dir, save_weights)
        if cfg.dev_per_class:
            (output_dir / "dev_ids.json").write_text(json.dumps([r.id for r in dev_rows], ensure_ascii=False))
        if eval_rows:
            write_report(output_dir, report, features, eval_gold, labels)
    if main_proc:
        print(outputs_summary(output_dir), flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report

