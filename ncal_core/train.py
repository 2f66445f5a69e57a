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
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ncal_core.batching import ATTENTION_BLOCKS, MEGABATCH_BATCHES, LengthGroupedBatches, collate
from ncal_core.checkpoint import (prune_checkpoints, read_optimizer_state, read_rng,
                                  read_state, resolve_checkpoint, save_checkpoint)
from ncal_core.cli import DTYPES, parse_config
from ncal_core.data import check_labels, dev_split, label_set, load_examples
from ncal_core.datasets import resolve_dataset
from ncal_core.distributed import gather_features
from ncal_core.errors import NCALError, run_cli
from ncal_core.evaluate import evaluate, write_report
from ncal_core.longtail import (class_counts, first_label_tokens, log_prior, logit_adjusted_loss, row_weights,
                                simplex_etf, etf_target_loss)
from ncal_core.lora import inject_lora, load_adapter, save_adapter
from ncal_core.model import load_model, save_model
from ncal_core.ncal import etf_gram_loss
from ncal_core.objective import TrainingObjective
from ncal_core.prompts import PromptBuilder, load_tokenizer
from ncal_core.run_files import RUN_FILE, prepare_output_dir, save_run_output, truncate_log
from ncal_core.schedule import make_optimizer, make_scheduler
from ncal_core.tiny import tiny_checkpoint
from ncal_core.train_config import BUILTIN_TINY, TrainConfig, uses_lora, uses_tc


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _eval_path(cfg: TrainConfig) -> Path | None:
    """The evaluation file: the flag, or the test split of a named dataset, or none."""
    if cfg.eval_dataset_path is not None:
        return None if cfg.eval_dataset_path.lower() == "none" else resolve_dataset(cfg.eval_dataset_path, "test")
    if Path(cfg.dataset_path).exists():
        return None
    return resolve_dataset(cfg.dataset_path, "test")


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


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


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
    # launched as several processes (accelerate launch --multi_gpu, torchrun) on a machine without CUDA:
    # without cpu=True accelerate starts every process as a lone rank 0, all writing the same folder
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no", cpu=multi_cpu)
    main_proc, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    output_dir = Path(cfg.output_dir)
    resume = resolve_checkpoint(cfg.resume_from_checkpoint, output_dir) if cfg.resume_from_checkpoint else None
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
    lr = cfg.learning_rate or (2e-4 if use_lora else 1e-3)
    # the label names go into the tiny tokenizer's corpus too, so each becomes a token or two
    with accelerator.main_process_first():  # the tiny model is built once, by the main process
        base = _base_model(cfg, [m["content"] for row in train_rows for m in row.messages]
                           + [row.label for row in train_rows])
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
        for layer in model.layers:
            layer.compile()
    use_tc = uses_tc(cfg.use_etf_loss, cfg.lambda_lc)
    first_tokens = torch.tensor(first_label_tokens(builder.label_ids, labels), device=accelerator.device) \
        if cfg.la_loss_tau > 0 else None
    objective = TrainingObjective(model, use_tc=use_tc, pooling=cfg.pooling, e_w=cfg.e_w, tc_backend=cfg.tc_backend,
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
        state = read_state(resume)
        # a Hugging Face Trainer checkpoint (the reference code's) has a trainer_state.json of another shape
        for key, kind in (("step", int), ("epoch", int), ("micro_batch", int), ("scheduler", dict)):
            if not isinstance(state.get(key), kind):
                raise NCALError(f"{resume / 'trainer_state.json'}: not a checkpoint of ncal_core.train "
                                f"(no {kind.__name__} {key!r})")
        try:
            optimizer.load_state_dict(read_optimizer_state(resume))
        except ValueError as err:
            raise NCALError(f"{resume / 'optimizer.pt'}: does not fit the model being trained ({err})") from None
        scheduler.load_state_dict(state["scheduler"])
        rng = read_rng(resume)
        _set_rng_state({k.removesuffix(f".rank{rank}"): v for k, v in rng.items() if k.endswith(f".rank{rank}")}
                       or rng)
        if main_proc and resume.parent.resolve() == output_dir.resolve() and "log_lines" in state:
            # what the interrupted run logged after this checkpoint is logged again by this run
            truncate_log(output_dir / "metrics.jsonl", state["log_lines"])
    else:
        torch.manual_seed(cfg.seed + rank)
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
        rng = _rng_state()
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
                                    prior_log=prior_log, tau=cfg.logit_adjust_tau)
        log({"step": state["step"], "epoch": state["epoch"], "eval": tag,
             "eval_accuracy": report["accuracy"], "eval_macro_f1": report["macro_f1"]})
        return report, features

    # the loop
    K = len(labels)
    accum = cfg.gradient_accumulation_steps
    objective.train()
    bar = tqdm(total=total_steps, initial=state["step"], disable=not main_proc, dynamic_ncols=True)
    # summed over the steps since the last log line: LM loss, target tokens, TC loss, micro-batches, rows
    sums = torch.zeros(5, device=accelerator.device)
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
                n_tokens = sum(len(encoded[i].input_ids) - encoded[i].prompt_len for rows in group for i in rows)
                for k, rows in enumerate(group):
                    mine = rows[rank * cfg.per_device_train_batch_size:(rank + 1) * cfg.per_device_train_batch_size]
                    batch = collate([encoded[i] for i in mine], tokenizer.pad_token_id,
                                    ATTENTION_BLOCKS if cfg.padding_free else 1).to(accelerator.device)
                    sync = k == len(group) - 1
                    with (nullcontext() if sync else accelerator.no_sync(objective)), accelerator.autocast():
                        lm_sum, z, first_scores, class_ids = objective(batch)
                        # DDP averages gradients over ranks: scale so the step's gradient is that of
                        # the mean over every target token of the global accumulated batch
                        loss = lm_sum * (world / n_tokens)
                        tc = torch.zeros((), device=accelerator.device)
                        if z is not None:
                            z_all, y_all = gather_features(z, class_ids)
                            tc = etf_target_loss(z_all, y_all, etf_targets) if etf_targets is not None else \
                                etf_gram_loss(z_all, y_all, K, e_w=cfg.e_w, class_diff=cfg.class_diff,
                                              backend=cfg.tc_backend, async_checks=True)
                            loss = loss + cfg.lambda_lc * tc / accum
                        if first_scores is not None:
                            loss = loss + logit_adjusted_loss(first_scores, class_ids, prior_log,
                                                              cfg.la_loss_tau) / accum
                    accelerator.backward(loss)
                    sums += torch.stack([lm_sum.detach().float(), torch.tensor(float(len(batch.target))),
                                         tc.detach().float() / world, torch.tensor(1.0 / world),
                                         torch.tensor(float(len(mine)))]).to(sums.device)
                if cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(objective.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["micro_batch"] += accum
                state["scheduler"] = scheduler.state_dict()
                bar.update(1)
                log_step = state["step"] % cfg.logging_steps == 0 or state["step"] == total_steps
                if log_step:
                    lm_sum_all, tokens, tc_all, micro, rows_seen = accelerator.reduce(sums, "sum").tolist()
                    lm_mean, tc_mean = lm_sum_all / tokens, tc_all / micro
                    total = lm_mean + (cfg.lambda_lc * tc_mean if use_tc else 0.0)
                    record = {"step": state["step"],
                              "epoch": round(state["epoch"] + state["micro_batch"] / len(batches), 4),
                              "loss": total, "lm_loss": lm_mean, "tc_loss": tc_mean,
                              "lr": scheduler.get_last_lr()[0],
                              "samples_per_s": rows_seen / max(time.perf_counter() - clock, 1e-9)}
                    bar.set_postfix(loss=f"{total:.4f}", lm=f"{lm_mean:.4f}", tc=f"{tc_mean:.4f}",
                                    lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}")
                    log(record)
                    sums.zero_()
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
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


if __name__ == "__main__":
    run_cli(main)
